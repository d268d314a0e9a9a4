"""Collapse guards: alarms when a run drifts into one of the ways OPD collapses quietly.

A `TrainerCallback` that reads the metrics already logged at each logging step (no extra compute)
and raises an alarm when one of four signals crosses its threshold:

| signal              | logged key                  | alarm when                                   |
|---------------------|-----------------------------|----------------------------------------------|
| `completion_length` | `completions/mean_length`   | > `guard_length_factor` x its start value    |
| `repetition_rate`   | `opd/repetition_rate`       | > `guard_repetition_rate`                    |
| `truncation_rate`   | `completions/clipped_ratio` | > `guard_truncation_rate`                    |
| `topk_mass`         | `opd/topk_mass`             | < `guard_topk_mass_drop` x its start value   |

Length inflation, repetition loops and truncation are StableOPD's collapse modes; the student's
mass on the teacher's top-k shrinking is how top-k reverse KL collapses (verl PR #5041). A start
value is the mean of the first `guard_start_logs` logged values of that signal. An alarm fires
after `guard_patience` consecutive logs past the threshold, once per excursion: it re-arms when
the signal is back within bounds. A threshold of 0 (or None) turns its guard off; a signal that is
never logged (top-k mass without `teacher_top_k`) keeps its guard silent.

Each alarm is a warning naming the signal, the step, the value and the field to change (logged;
during training the console writes it on a line of its own, opd/trainer/console.py); a JSON
line `{"step", "signal", "value", "threshold", "message", "field", "start"}` in
`output_dir/opd_alarms.jsonl` (`threshold` is the absolute bound crossed); and the running count
`guard/alarms` in the logs (so it reaches `report_to`). With `guard_action="stop"` the alarm also
ends training (`control.should_training_stop`); the caller still saves the model.

Test: `pytest tests/unit/test_guards.py tests/integration/test_guards.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from opd.types import GuardAction

logger = logging.getLogger(__name__)

ALARMS_FILE = "opd_alarms.jsonl"
ALARM_COUNT_KEY = "guard/alarms"


@dataclass(frozen=True)
class Signal:
    """One guarded metric and how its threshold reads."""

    name: str
    key: str  # the metric's key in the trainer's logs
    field: str  # the OPDConfig field holding its threshold
    relative: bool  # the threshold is a factor of the signal's start value
    rises: bool  # collapse is the value going up (else down)
    unit: str = ""
    hint: str = ""  # when the metric is logged at all


SIGNALS = (
    Signal("completion_length", "completions/mean_length", "guard_length_factor",
           relative=True, rises=True, unit=" tokens"),
    Signal("repetition_rate", "opd/repetition_rate", "guard_repetition_rate",
           relative=False, rises=True),
    Signal("truncation_rate", "completions/clipped_ratio", "guard_truncation_rate",
           relative=False, rises=True),
    Signal("topk_mass", "opd/topk_mass", "guard_topk_mass_drop", relative=True, rises=False,
           hint=" (it is logged only with teacher_top_k > 0)"),
)  # fmt: skip


@dataclass(frozen=True)
class Alarm:
    """One fired guard; `threshold` is the absolute bound the value crossed."""

    step: int
    signal: str
    value: float
    threshold: float
    message: str
    field: str
    start: float | None


@dataclass
class _Track:
    """What the guard remembers of one signal between logs."""

    start_values: list[float] = field(default_factory=list)
    streak: int = 0  # consecutive logs past the threshold
    fired: bool = False  # already alarmed in the current excursion
    seen: bool = False


class CollapseGuard(TrainerCallback):
    """Watches the logged metrics; see the module docstring for the signals and thresholds.

    Args:
        thresholds: signal name -> threshold (the value of its `guard_*` field); 0/None: off.
        action: "warn" logs the alarm; "stop" also ends training.
        patience: consecutive logs past a threshold before the alarm fires (>= 1).
        start_logs: logged values averaged into a relative signal's start value (>= 1).
        explicit: signals whose threshold the user set; if never logged, say so at the end.
    """

    def __init__(
        self,
        thresholds: dict[str, float | None],
        *,
        action: GuardAction = GuardAction.WARN,
        patience: int = 1,
        start_logs: int = 3,
        explicit: frozenset[str] = frozenset(),
    ):
        if action not in list(GuardAction) or patience < 1 or start_logs < 1:
            raise ValueError(f"bad guard settings: {action=}, {patience=}, {start_logs=}")
        self.thresholds = {s.name: float(v) for s in SIGNALS if (v := thresholds.get(s.name))}
        self.signals = [s for s in SIGNALS if s.name in self.thresholds]
        self.action, self.patience, self.start_logs = action, patience, start_logs
        self.explicit = explicit
        self.alarms: list[Alarm] = []
        self._tracks = {s.name: _Track() for s in self.signals}

    @classmethod
    def from_config(cls, args: Any) -> CollapseGuard:
        """The guard an `OPDConfig` asks for."""
        defaults = {f.name: f.default for f in dataclasses.fields(args)}
        explicit = frozenset(
            s.name
            for s in SIGNALS
            if getattr(args, s.field) and getattr(args, s.field) != defaults.get(s.field)
        )
        return cls(
            {s.name: getattr(args, s.field) for s in SIGNALS},
            action=args.guard_action,
            patience=args.guard_patience,
            start_logs=args.guard_start_logs,
            explicit=explicit,
        )

    # ----- TrainerCallback events -----

    def on_train_begin(self, args, state, control, **kwargs):
        """Replay the logs of a resumed run silently: start values and excursions carry over.
        A fresh run drops the alarms file an earlier run left in the same output_dir."""
        self.alarms = []
        self._tracks = {s.name: _Track() for s in self.signals}
        if not state.log_history and state.is_world_process_zero:
            (Path(args.output_dir) / ALARMS_FILE).unlink(missing_ok=True)
        for entry in state.log_history:
            self.observe(entry, step=int(entry.get("step", 0)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        fired = self.observe(logs, step=state.global_step)
        if not any(s.key in logs for s in self.signals):
            return
        logs[ALARM_COUNT_KEY] = len(self.alarms)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][ALARM_COUNT_KEY] = len(self.alarms)  # appended before on_log
        if fired and state.is_world_process_zero:
            path = Path(args.output_dir) / ALARMS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as file:
                for alarm in fired:
                    logger.warning(alarm.message)
                    file.write(json.dumps(dataclasses.asdict(alarm)) + "\n")
        if fired and self.action == GuardAction.STOP:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for signal in self.signals:
            if signal.name in self.explicit and not self._tracks[signal.name].seen:
                logger.warning(
                    f"opd guard: {signal.field} is set but {signal.key} was never logged"
                    f"{signal.hint}; the {signal.name} guard did nothing."
                )

    # ----- the detector (pure: no I/O) -----

    def observe(self, logs: dict[str, Any], step: int) -> list[Alarm]:
        """Feed one log entry; returns the alarms it fires (also kept in `self.alarms`)."""
        fired = []
        for signal in self.signals:
            value = logs.get(signal.key)
            if value is None or not math.isfinite(value):  # not logged this time
                continue
            alarm = self._update(signal, float(value), step)
            if alarm is not None:
                fired.append(alarm)
        self.alarms.extend(fired)
        return fired

    def _update(self, signal: Signal, value: float, step: int) -> Alarm | None:
        track = self._tracks[signal.name]
        track.seen = True
        setting = self.thresholds[signal.name]
        start = None
        if signal.relative:
            if len(track.start_values) < self.start_logs:  # still measuring where it starts
                track.start_values.append(value)
                return None
            start = sum(track.start_values) / len(track.start_values)
            if start <= 0:  # nothing to compare a length or a mass with
                return None
        bound = setting * start if start is not None else setting
        crossed = value > bound if signal.rises else value < bound
        if not crossed:
            track.streak, track.fired = 0, False  # back within bounds: re-arm
            return None
        track.streak += 1
        if track.fired or track.streak < self.patience:
            return None
        track.fired = True
        message = self._message(signal, value, step, start)
        return Alarm(step, signal.name, value, bound, message, signal.field, start)

    def _message(self, signal: Signal, value: float, step: int, start: float | None) -> str:
        setting = self.thresholds[signal.name]
        head = f"opd guard: {signal.name} at step {step} is {round(value, 3)}{signal.unit}"
        if start is not None:
            ratio = f"{value / start:.2f}x its start {round(start, 3)}"
            crossed = f"{ratio} ({signal.field} {setting:g})"
        else:
            side = "above" if signal.rises else "below"
            crossed = f"{side} {signal.field} {setting:g}"
        streak = f" for {self.patience} logs in a row" if self.patience > 1 else ""
        if self.action == GuardAction.STOP:
            action = "stopping training (guard_action=stop)"
        else:
            action = "warning only (guard_action=warn; 'stop' ends the run)"
        return f"{head}, {crossed}{streak}; {action}"


def attach_collapse_guard(trainer: Any) -> CollapseGuard:
    """Add the guard of `trainer.args` to the trainer's callbacks, first in line: on_log then
    puts `guard/alarms` into the logs before the progress printer and `report_to` callbacks
    read them (`Trainer.add_callback` would append it after them)."""
    guard = CollapseGuard.from_config(trainer.args)
    trainer.callback_handler.callbacks.insert(0, guard)
    return guard
