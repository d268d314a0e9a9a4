"""`opd report` on a real logged run: a tiny TIP q3 run (demo models, 3 steps, in process).

`opd distill` must leave `report/index.html` and its PNGs in the output_dir; the PNGs must be
real images showing the logged curves; `opd report RUN_DIR` must redraw them with a collapse
alarm added afterwards (a synthetic line in `opd_alarms.jsonl`: the tiny run raises none for
sure) and the TIP scatter must hold exactly the tokens the trainer sampled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from opd.cli import main
from opd.report.plots import DPI, FIGURE_SIZE, PLOTS, build_metric_figure
from opd.report.run_log import load_run, metric_series

RECIPE = Path(__file__).parents[2] / "recipes" / "tip_q3-tiny.yaml"
SPECS = {spec.name: spec for spec in PLOTS}
ALARM = {"step": 2, "signal": "completion_length", "value": 4.0, "threshold": 3.5,
         "message": "synthetic alarm for the test"}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("tip_q3_report")
    args = ["distill", "--config", str(RECIPE), "--output_dir", str(output_dir),
            "--max_steps", "3", "--reward_funcs", "demo_accuracy"]  # fmt: skip
    assert main(args) == 0
    return output_dir


def _referenced_pngs(index: Path) -> set[str]:
    return set(re.findall(r"<img src='([^']+\.png)'", index.read_text()))


def test_distill_writes_the_report(run_dir):
    report = run_dir / "report"
    pngs = {path.name for path in report.glob("*.png")}
    expected = {"reverse_kl.png", "entropy.png", "reward.png", "length.png", "truncation.png",
                "kept_fraction.png", "importance_ratio.png", "teacher_latency.png",
                "tip_scatter.png"}  # fmt: skip
    assert expected <= pngs
    assert "topk_mass.png" not in pngs  # teacher_top_k 0: no top-k mass logged
    assert _referenced_pngs(report / "index.html") == pngs
    page = (report / "index.html").read_text()
    assert "Student mass on the teacher&#x27;s top-k (opd/topk_mass)" in page  # listed as skipped


def test_png_is_a_real_image_of_the_curves(run_dir):
    image = imread(run_dir / "report" / "reverse_kl.png")
    width, height = (round(inches * DPI) for inches in FIGURE_SIZE)
    assert image.shape == (height, width, 4)
    rgb = image[..., :3]
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.01, "the image is (nearly) blank"
    # The k1 curve is drawn in matplotlib's first colour, C0 = #1f77b4.
    c0 = np.array([0x1F, 0x77, 0xB4]) / 255
    assert (np.abs(rgb - c0).max(axis=-1) < 0.03).sum() > 200


def test_figure_lines_are_the_logged_values(run_dir):
    history = json.loads((run_dir / "opd_results.json").read_text())["log_history"]
    figure = build_metric_figure(SPECS["reverse_kl"], history, [], run_name="r")
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    steps, values = metric_series(history, "opd/reverse_kl_k1")
    assert steps == [1, 2, 3]
    k1 = lines["k1 estimate on sampled tokens"]
    assert list(k1.get_xdata()) == steps and list(k1.get_ydata()) == values
    exact = lines["exact, over the vocabulary"]  # this run logs the exact KL too
    assert list(exact.get_ydata()) == metric_series(history, "opd/reverse_kl")[1]


def test_tip_samples_are_the_scatter_points(run_dir):
    samples = load_run(run_dir).tip_samples
    assert [sample["step"] for sample in samples] == [1, 2, 3]
    for sample in samples:
        assert 0 < len(sample["h"]) == len(sample["j"]) == len(sample["kept"]) <= 256
        assert 0 <= sample["h_threshold"] <= 1 and 0 <= sample["j_threshold"] <= 1
    from opd.report.tip_scatter import build_tip_figure

    figure = build_tip_figure(samples, run_name="r")
    num_points = sum(len(c.get_offsets()) for c in figure.axes[0].collections)
    assert num_points == sum(len(sample["h"]) for sample in samples)


def test_opd_report_command_draws_alarms(run_dir, tmp_path, capsys):
    with (run_dir / "opd_alarms.jsonl").open("a") as file:
        file.write(json.dumps(ALARM) + "\n")
    out = tmp_path / "again"
    assert main(["report", str(run_dir), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "index.html") in printed and str(out / "length.png") in printed
    page = (out / "index.html").read_text()
    assert "completion_length</b> = 4 (threshold 3.5) synthetic alarm for the test" in page
    assert _referenced_pngs(out / "index.html") == {path.name for path in out.glob("*.png")}
    run = load_run(run_dir)
    figure = build_metric_figure(SPECS["length"], run.history, run.alarms, run_name="r")
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert "alarm: completion_length at step 2 (4, threshold 3.5)" in labels


def test_opd_report_without_metrics_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opd report: error:") and "opd_results.json" in err
