"""N processes train the same model as 1 process on the same global batch (real `torchrun`, gloo).

For every method the issue names (vanilla OPD under each loss_type, vOPD, TIP's q3 and
entropy_sample, SCOPE and Uni-OPD with groups split over processes, SOD, LUFFY traces, the
family-B divergence term, the union support: candidate sets and the top-k baseline; and from
METHODS.md s.10 the CTPO and BAPO ratio forms, VCPO's ESS-scaled lr and min-variance baseline,
CHORD's imitation stream, HAPO's Thompson gate with BEPA's cache, TCOD's depth mask; and from
s.11 MOPD's peer contexts over groups split across processes and TRACE's routed terms; and a
teacher of another tokenizer: span rewards, GOLD/ULD at span starts),
`tests/integration/mp_train.py` trains 2 steps on fixed rollouts with plain SGD and no gradient
clipping (both would hide a wrong loss scale) in four layouts of one global batch of 4:

    1 process x 4 rows          the reference
    2 processes x 2 rows        DDP: loss normalisation, global TIP/SCOPE decisions, metrics
    2 processes x 2 rows FSDP2  `fully_shard` on CPU: the lm_head gathered per micro-step
    1 process x 2 rows x 2 accumulation steps

and every layout must end with the reference's weights (max abs difference <= 1e-5) and log the
same losses. bnpo is the one exception under accumulation: it normalises each micro-batch by
definition (as TRL's), so only its multi-process form must match.

Runs in the default test run (~2 min on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("mp_train.py")
METHODS = (
    "vanilla", "vanilla_grpo", "vanilla_bnpo", "vanilla_dr_grpo", "vopd", "tip_q3",
    "tip_sample", "scope", "uni_opd", "sod", "luffy", "divergence", "union",
    "ctpo", "bapo", "vcpo", "chord", "hapo_bepa", "tcod", "mopd", "trace", "cross_tokenizer",
)  # fmt: skip
LAYOUTS = {  # name: (processes, rows per process, accumulation steps, extra flags)
    "ddp": (2, 2, 1, []),
    "fsdp2": (2, 2, 1, ["--fsdp"]),
    "accumulation": (1, 2, 2, []),  # trained with the reference, in `single_process`
}
PER_MICRO_BATCH = {"accumulation": {"vanilla_bnpo"}}  # by definition, see the docstring


def _train(out: Path, student, teacher, processes: int, rows: int, accumulation: int, extra):
    out.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, str(SCRIPT)]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", str(SCRIPT),
        ]  # fmt: skip
    command = [
        *launcher, "--student", str(student), "--teacher", str(teacher), "--out", str(out),
        "--bpe_teacher", str(_bpe_teacher(out.parent)),
        *(["--per_device_batch", str(rows), "--accumulation", str(accumulation)] if rows else []),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _bpe_teacher(folder: Path) -> Path:
    """The cross_tokenizer method's teacher: a tiny BPE model (deterministic: same seed, same
    files), written once per folder before any process starts."""
    from opd.demo.bpe import save_tiny_bpe

    path = folder / "bpe_teacher"
    if not (path / "config.json").exists():
        save_tiny_bpe(path, seed=1)
    return path


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_student, tiny_teacher) -> Path:
    """The 1-process layouts in one launch: OUT/4x1 (the reference) and OUT/2x2."""
    out = tmp_path_factory.mktemp("one_process")
    _train(out, tiny_student, tiny_teacher, 1, 0, 1, ["--layouts", "4x1,2x2"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_the_same_weights_as_one_process(
    layout, single_process, tmp_path, tiny_student, tiny_teacher
):
    processes, rows, accumulation, extra = LAYOUTS[layout]
    reference, log = single_process / "4x1", ""
    if layout == "accumulation":
        tmp_path = single_process / "2x2"
    else:
        log = _train(tmp_path, tiny_student, tiny_teacher, processes, rows, accumulation, extra)
    if layout == "fsdp2":  # the run was really sharded (accelerate would fall back to DDP)
        assert log.count("FSDP2 ok: lm_head shard") == 2 * len(METHODS), log[-3000:]
    failures = []
    for method in METHODS:
        expected = torch.load(reference / f"{method}.pt")
        got = torch.load(tmp_path / f"{method}.pt")
        difference = max(
            (expected["state"][name] - got["state"][name]).abs().max().item()
            for name in expected["state"]
        )
        moved = max(
            (expected["state"][name] - initial).abs().max().item()
            for name, initial in _initial_state(tiny_student).items()
        )
        assert moved > 1e-3, f"{method}: training did not move the weights"
        if method in PER_MICRO_BATCH.get(layout, ()):
            continue
        if difference > 1e-5 or got["losses"] != pytest.approx(expected["losses"], abs=1e-5):
            failures.append(f"{method}: max |dw| {difference:.2e}, losses {got['losses']} vs "
                            f"{expected['losses']}")  # fmt: skip
    assert not failures, "\n".join(failures)


def _initial_state(student) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    return {name: value.float() for name, value in model.state_dict().items()}
