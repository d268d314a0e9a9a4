"""What a run resumed from a checkpoint needs to continue exactly as if it had never stopped.

transformers' Trainer restores the weights, the optimizer, the learning-rate schedule, the RNG
states and the trainer state (whose log replays opd's collapse guard, `opd/guards.py`), then
skips the batches already trained in the current epoch. Four things it does not handle:

- **The sampler's order in later epochs.** TRL's `RepeatSampler` draws a new permutation from one
  generator each time it is iterated, so epoch `e`'s order depends on `e` earlier iterations; a
  run resumed in epoch 1 replayed epoch 0's order (a 6-step run ended 2.4e-3 off).
  `EpochSeededRepeatSampler` re-seeds when iterated and draws the permutations of the epochs
  before the current one, so every epoch's order is exactly TRL's.
- **A generation reused over several steps** (`num_iterations > 1`, or `steps_per_generation`
  above the accumulation steps). A checkpoint inside such a cycle used to resume by generating
  afresh: new lp_old, a shifted cycle (a 6-step run ended 4.7e-3 off). Each process now writes its
  buffered generation and step counter into the checkpoint (`opd_generation_buffer_<rank>.pt`)
  and reads them back on resume. The run's resolved config is copied in too: `opd distill`
  refuses a resume whose settings differ from it.
- **A checkpoint written mid-step** (the teacher stayed down: `OPDTrainer._teacher_scores`).
  The step's samples were drawn already, so the RNG states transformers would save are past
  them, and the resumed run would sample that step differently from the uninterrupted one.
  `capture_rng_state` is taken when each generation starts, and `restore_rng_state` puts it back
  before that checkpoint is written.
- **A checkpoint cut off while being written** (a killed run). Process 0 writes
  `trainer_state.json` after its own files, but other processes' RNG states (and buffers) are not
  waited for, and transformers resumes without a missing RNG file, silently. `checkpoint_problem`
  says what is missing; `resolve_checkpoint` refuses such a folder and finds the latest complete
  one for `resume_from_checkpoint=True` (transformers would take the highest-numbered folder).

Test: `pytest tests/integration/test_crash_resume.py tests/unit/test_trl_surface.py`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd.arguments import ConfigError
from opd.trainer.trl_seams import (
    REPEAT_SAMPLER_PARAMS,
    RepeatSampler,
    generation_buffer,
    generation_cycle_length,
    save_checkpoint,
    set_generation_buffer,
)

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "opd_config.yaml"  # `opd distill`'s resolved config (opd/config.py)
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle in epoch `e` does not depend on past iterations.

    `epoch_of()` says which epoch is starting when the sampler is iterated (the trainer's state:
    loaded from the checkpoint on resume). transformers' `set_epoch` is not enough: through
    accelerate's wrappers (a multi-process run that skips batches) it never reaches the sampler.
    """

    def __init__(self, *args, epoch_of: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_of = epoch_of

    @classmethod
    def from_sampler(cls, sampler, epoch_of: Callable[[], int]) -> EpochSeededRepeatSampler:
        """The same sampler as TRL's `sampler` (a `RepeatSampler`), re-seeded per epoch."""
        fields = {name: getattr(sampler, name) for name in REPEAT_SAMPLER_PARAMS}
        return cls(**fields, epoch_of=epoch_of)

    def __iter__(self):
        if self.shuffle and self.seed is not None:  # else nothing to replay
            self.generator.manual_seed(self.seed)
            for _ in range(self.epoch_of()):  # epochs 0 .. e-1's permutations, as TRL drew them
                torch.randperm(self.num_samples, generator=self.generator)
        return super().__iter__()


# ------------------------------------------------------------------------------------------------
# The buffered generation
# ------------------------------------------------------------------------------------------------


def buffer_file(process_index: int) -> str:
    return f"opd_generation_buffer_{process_index}.pt"


def save_resume_state(trainer, checkpoint: Path) -> None:
    """What opd adds to a checkpoint, written before TRL's files so that process 0's
    `trainer_state.json` (written last) vouches for its part: the run's resolved config (which
    `opd distill` compares a resume's settings with) and the buffered generation."""
    config = Path(trainer.args.output_dir) / RUN_CONFIG
    if trainer.args.should_save and config.is_file():  # written by `opd distill`
        checkpoint.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, checkpoint / RUN_CONFIG)
    save_generation_buffer(trainer, checkpoint)


def save_generation_buffer(trainer, checkpoint: Path) -> None:
    """Write this process's buffered generation into `checkpoint` when the step is inside a
    generation cycle (at a boundary the resumed run generates, as the uninterrupted one does)."""
    step, buffered = generation_buffer(trainer)
    if step % generation_cycle_length(trainer) == 0 or buffered is None:
        return
    checkpoint.mkdir(parents=True, exist_ok=True)
    path = checkpoint / buffer_file(trainer.accelerator.process_index)
    temporary = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"step": step, "buffered_inputs": buffered}, temporary)
    os.replace(temporary, path)  # a killed write leaves no half file under the real name


def capture_rng_state() -> dict[str, Any]:
    """The random states transformers saves in a checkpoint (python, numpy, torch CPU, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "cpu": torch.random.get_rng_state()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.random.set_rng_state_all(state["cuda"])


def stopped_for_outage(trainer, rng_state: dict[str, Any], error: Exception) -> Exception:
    """Checkpoint the last finished step and return the error that stops the run, for a teacher
    that stays down past its retry budget in the middle of phase 1.

    Generation happens before any gradient of the step, so the weights are still those of the
    last finished step; the random states go back to those from before the step sampled
    (`rng_state`), so `checkpoint-<global_step>` resumes to the uninterrupted run's weights,
    without losing or repeating a batch.
    """
    restore_rng_state(rng_state)
    checkpoint = save_checkpoint(trainer)
    return type(error)(
        f"{error}\nTraining stopped at step {trainer.state.global_step}; saved {checkpoint}. "
        f"Once the teacher is back: opd distill ... --resume_from_checkpoint {checkpoint}"
    )


def load_generation_buffer(trainer, checkpoint: str | Path) -> None:
    path = Path(checkpoint) / buffer_file(trainer.accelerator.process_index)
    if not path.exists():  # saved at a cycle boundary: the resumed run generates first
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)
    device = trainer.accelerator.device
    buffered = [
        {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        for batch in saved["buffered_inputs"]
    ]
    set_generation_buffer(trainer, saved["step"], buffered)


# ------------------------------------------------------------------------------------------------
# Which checkpoint to resume from
# ------------------------------------------------------------------------------------------------


def checkpoint_problem(folder: str | Path, num_processes: int) -> str | None:
    """What a checkpoint folder lacks to resume exactly, or None when it is complete.

    Process 0 writes `trainer_state.json` last among its files (weights, optimizer, scheduler,
    its RNG state); what may still be missing then is the other processes' files.
    """
    folder = Path(folder)
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE}"
    ranks = range(num_processes)
    required = ["rng_state.pth"] if num_processes == 1 else [f"rng_state_{p}.pth" for p in ranks]
    if (folder / buffer_file(0)).exists():
        required += [buffer_file(p) for p in ranks]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        return f"no {', '.join(missing)} (for {num_processes} process(es))"
    return None


def latest_complete_checkpoint(output_dir: str | Path, num_processes: int) -> Path | None:
    """The highest-numbered `checkpoint-<step>` folder of `output_dir` that is complete."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    numbered = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name))
    ]
    for _, path in sorted(numbered, reverse=True):
        if checkpoint_problem(path, num_processes) is None:
            return path
    return None


def resolve_checkpoint(
    resume_from_checkpoint: str | bool, output_dir: str | Path | None, num_processes: int
) -> str:
    """The folder to resume from: the given one if complete; for True, the latest complete one
    in `output_dir`. Raises `ConfigError` naming what is missing and what to use instead."""
    if resume_from_checkpoint is True:
        folder = Path(output_dir or ".")
    else:
        folder = Path(str(resume_from_checkpoint)).parent
    latest = latest_complete_checkpoint(folder, num_processes)
    if resume_from_checkpoint is True:
        if latest is None:
            raise ConfigError(
                f"resume_from_checkpoint: no complete checkpoint-<step> folder in {output_dir}; "
                "start without --resume_from_checkpoint or point it at a checkpoint folder."
            )
        return str(latest)
    problem = checkpoint_problem(str(resume_from_checkpoint), num_processes)
    if problem is None:
        return str(resume_from_checkpoint)
    instead = f"resume from {latest} (the latest complete one)" if latest else "start afresh"
    raise ConfigError(
        f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete ({problem}): it was cut "
        f"off while being written, or saved by another number of processes; {instead}."
    )
