"""The console during training: one compact line per logging step under an intact progress bar.

transformers' `ProgressCallback` (and `PrinterCallback` with `disable_tqdm`) prints the whole
logs dict at every logging step, 30-odd metrics that bury the bar and the guard warnings. Here the
console gets one line per logging event instead:

    step 2/4 | loss 1.505 | reverse_kl 1.505 | reward 0 | length 1 | 1.34 s/step | alarms 1

Only the printers are replaced: every metric still reaches `report_to` and the trainer's
`log_history` (written to the run folder as `opd_results.json` and each checkpoint's
`trainer_state.json`), since those read the logs through their own callbacks. Only the main
process prints. During `train()` console logging goes through `tqdm.write` too
(`console_logging`), so a warning (the collapse guard's, `opd/guards.py`, or TRL's) gets a line
of its own instead of being glued to the bar.

Test: `pytest tests/unit/test_console.py tests/integration/test_guards.py`.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import PrinterCallback, ProgressCallback

from opd.guards import ALARM_COUNT_KEY

# (label, logged key): what a step's line shows, in order; a key not logged is left out.
LINE_FIELDS = (
    ("loss", "loss"),
    ("reverse_kl", "opd/reverse_kl_k1"),
    ("reward", "reward"),
    ("length", "completions/mean_length"),
)
EVAL_PREFIX = "eval_"  # TRL and transformers prefix every evaluation metric with it


def format_log_line(logs: dict[str, Any], *, step: int, max_steps: int) -> str:
    """The console line for one logging event: a training step, an evaluation or the end of
    training (transformers' summary with `train_runtime`)."""
    if "train_runtime" in logs:
        steps = f"{step} step" + ("" if step == 1 else "s")
        parts = [f"done: {steps} in {logs['train_runtime']:.1f} s"]
        if "train_loss" in logs:
            parts.append(f"mean loss {logs['train_loss']:.4g}")
        return ", ".join(parts)
    evaluating = any(key.startswith(EVAL_PREFIX) for key in logs)
    prefix = EVAL_PREFIX if evaluating else ""
    parts = [f"{'eval at ' if evaluating else ''}step {step}/{max_steps}"]
    for label, key in LINE_FIELDS:
        value = logs.get(prefix + key)
        if isinstance(value, int | float):
            parts.append(f"{label} {value:.4g}")
    if isinstance(step_time := logs.get(prefix + "step_time"), int | float):
        parts.append(f"{step_time:.3g} s/step")
    if logs.get(ALARM_COUNT_KEY):
        parts.append(f"alarms {logs[ALARM_COUNT_KEY]}")
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, with one compact line per logging event written above it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            line = format_log_line(logs or {}, step=state.global_step, max_steps=state.max_steps)
            self.training_bar.write(line)


class CompactPrinterCallback(PrinterCallback):
    """The printer used with `disable_tqdm`: the same compact line, no bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            print(format_log_line(logs or {}, step=state.global_step, max_steps=state.max_steps))


def use_compact_console(trainer: Any) -> None:
    """Swap the trainer's default printer for its compact twin, in place (callback order is
    kept). Other printers (a notebook's) are left as they are."""
    callbacks = trainer.callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) is ProgressCallback:
            callbacks[index] = CompactProgressCallback()
        elif type(callback) is PrinterCallback:
            callbacks[index] = CompactPrinterCallback()


def console_logging(trainer: Any) -> AbstractContextManager:
    """Around `train()`: console logging through `tqdm.write` on the process that shows the bar.

    The root logger (opd, TRL, math-verify...) and transformers' own, which does not propagate:
    their console handlers are swapped for tqdm's, which lifts the bar off its line before a
    record is written. A context manager, not callback events, so that a run that raises still
    gets its handlers back.
    """
    if trainer.args.disable_tqdm or not trainer.is_world_process_zero():
        return nullcontext()
    return logging_redirect_tqdm([logging.getLogger(), logging.getLogger("transformers")])
