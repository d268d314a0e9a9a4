"""Reading a run folder for `opd report`: where the metrics come from, alarms, TIP samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.report.run_log import ReportError, load_run, logged_keys, metric_series


def _history(steps: range, scale: float = 1.0) -> list[dict]:
    entries: list[dict] = [
        {"step": step, "epoch": step / 10, "opd/reverse_kl_k1": scale * step, "loss": 0.5}
        for step in steps
    ]
    return entries


def _checkpoint(run_dir: Path, step: int, scale: float) -> None:
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    state = {"global_step": step, "log_history": _history(range(1, step + 1), scale)}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_reads_the_finished_run_results(tmp_path):
    results = {"train_wall_s": 3.5, "log_history": _history(range(1, 4)), "before": {"a": 1}}
    (tmp_path / "opd_results.json").write_text(json.dumps(results))
    _checkpoint(tmp_path, 2, scale=9.0)  # older than the results: ignored
    (tmp_path / "opd_config.yaml").write_text("# header\ntip_rule: q3\nrun_name: null\n")
    run = load_run(tmp_path)
    assert run.finished and run.source == tmp_path / "opd_results.json"
    assert metric_series(run.history, "opd/reverse_kl_k1") == ([1, 2, 3], [1.0, 2.0, 3.0])
    assert run.results == {"train_wall_s": 3.5, "before": {"a": 1}}
    assert run.config["tip_rule"] == "q3"


def test_a_run_that_died_falls_back_to_the_newest_checkpoint(tmp_path):
    """checkpoint-10 is newer than checkpoint-9 (numeric, not string, order)."""
    _checkpoint(tmp_path, 9, scale=1.0)
    _checkpoint(tmp_path, 10, scale=2.0)
    (tmp_path / "checkpoint-tmp").mkdir()  # not a step: ignored
    run = load_run(tmp_path)
    assert not run.finished
    assert run.source == tmp_path / "checkpoint-10" / "trainer_state.json"
    steps, values = metric_series(run.history, "opd/reverse_kl_k1")
    assert steps == list(range(1, 11)) and values[-1] == 20.0
    assert run.results == {}


def test_a_checkpoint_folder_itself_is_a_run(tmp_path):
    _checkpoint(tmp_path, 3, scale=1.0)
    run = load_run(tmp_path / "checkpoint-3")
    assert run.source == tmp_path / "checkpoint-3" / "trainer_state.json"


def test_no_metrics_names_what_it_looked_for(tmp_path):
    with pytest.raises(ReportError, match=r"opd_results\.json.*checkpoint-\*/trainer_state\.json"):
        load_run(tmp_path)
    with pytest.raises(ReportError, match="not a folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "opd_results.json").write_text(json.dumps({"log_history": []}))
    with pytest.raises(ReportError, match="no log_history entries"):
        load_run(tmp_path)


def test_alarms_and_tip_samples(tmp_path):
    (tmp_path / "opd_results.json").write_text(json.dumps({"log_history": _history(range(1, 3))}))
    alarms = [{"step": 7, "signal": "topk_mass"}, {"step": 3, "signal": "repetition_rate"}]
    (tmp_path / "opd_alarms.jsonl").write_text("".join(json.dumps(a) + "\n" for a in alarms))
    samples = [{"step": 2, "h": [0.1]}, {"step": 1, "h": [0.2]}, {"step": 2, "h": [0.3]}]
    lines = [json.dumps(s) for s in samples] + ['{"step": 3, "h": [0.']  # half-written last line
    (tmp_path / "opd_tip_tokens.jsonl").write_text("\n".join(lines))
    run = load_run(tmp_path)
    assert [a["step"] for a in run.alarms] == [3, 7]
    # A resumed run rewrites a step: the last line of each step wins.
    assert run.tip_samples == [{"step": 1, "h": [0.2]}, {"step": 2, "h": [0.3]}]


def test_metric_series_and_logged_keys_skip_non_numbers():
    history = [
        {"step": 1, "a": 1.0, "b": True, "c": "x"},
        {"step": 2, "a": float("nan")},
        {"a": 3.0},  # no step: not a training log
        {"step": 4, "a": 4},
    ]
    steps, values = metric_series(history, "a")
    assert steps == [1, 2, 4] and values[0] == 1.0 and values[2] == 4.0
    assert logged_keys(history) == {"step", "a"}
