"""Collapse guards on synthetic metric streams: each signal fires once where it should, with the
right step, message, alarms-file line and stop flag, and stays silent where it should not.

The streams go through `CollapseGuard.on_log` the way `Trainer.log` sends them (the entry is
appended to `state.log_history`, then the callbacks run), with real `TrainerState`,
`TrainerControl` and `TrainingArguments`.
"""

from __future__ import annotations

import json
import logging

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from opd.config import OPDConfig
from opd.guards import ALARM_COUNT_KEY, ALARMS_FILE, CollapseGuard

KEYS = {
    "completion_length": "completions/mean_length",
    "repetition_rate": "opd/repetition_rate",
    "truncation_rate": "completions/clipped_ratio",
    "topk_mass": "opd/topk_mass",
}
FIELDS = {
    "completion_length": "guard_length_factor",
    "repetition_rate": "guard_repetition_rate",
    "truncation_rate": "guard_truncation_rate",
    "topk_mass": "guard_topk_mass_drop",
}
THRESHOLDS = {  # the settings the streams below are written against
    "completion_length": 2.0,
    "repetition_rate": 0.3,
    "truncation_rate": 0.5,
    "topk_mass": 0.5,
}
# signal -> (stream that must fire, the step it fires at, message fragment, stream that must not)
STREAMS = {
    # start = mean(100, 110, 90) = 100; 210 > 2 x 100 at step 6. Silent: peaks at 1.9x.
    "completion_length": (
        [100, 110, 90, 150, 190, 210, 230], 6,
        "completion_length at step 6 is 210.0 tokens, 2.10x its start 100.0 "
        "(guard_length_factor 2)",
        [100, 110, 90, 150, 190, 189, 180],
    ),
    # Silent: noisy but never above 0.3.
    "repetition_rate": (
        [0.05, 0.1, 0.2, 0.35, 0.4], 4,
        "repetition_rate at step 4 is 0.35, above guard_repetition_rate 0.3",
        [0.05, 0.29, 0.1, 0.25, 0.3, 0.2],
    ),
    # Silent: at the threshold is not past it.
    "truncation_rate": (
        [0.1, 0.3, 0.6, 0.7], 3,
        "truncation_rate at step 3 is 0.6, above guard_truncation_rate 0.5",
        [0.5, 0.4, 0.5, 0.45],
    ),
    # start = 0.85; 0.42 < 0.5 x 0.85 = 0.425 at step 5. Silent: bottoms out at 0.45.
    "topk_mass": (
        [0.8, 0.9, 0.85, 0.6, 0.42, 0.3], 5,
        "topk_mass at step 5 is 0.42, 0.49x its start 0.85 (guard_topk_mass_drop 0.5)",
        [0.8, 0.9, 0.85, 0.5, 0.45, 0.6],
    ),
}  # fmt: skip


def make_guard(**kwargs) -> CollapseGuard:
    settings = {"action": "warn", "patience": 1, "start_logs": 3, **kwargs}
    thresholds = settings.pop("thresholds", THRESHOLDS)
    return CollapseGuard(thresholds, **settings)


def feed(guard, tmp_path, logs_list, state=None):
    """Send each log dict through `on_log` at steps 1, 2, ...; returns (state, control, logs)."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = state or TrainerState()
    control = TrainerControl()
    guard.on_train_begin(args, state, control)
    sent = []
    for logs in logs_list:
        state.global_step += 1
        logs = {"loss": 1.0, **logs}
        state.log_history.append({**logs, "step": state.global_step})  # as Trainer.log does
        guard.on_log(args, state, control, logs=logs)
        sent.append(logs)
    return state, control, sent


def stream(signal: str, values) -> list[dict[str, float]]:
    return [{KEYS[signal]: value} for value in values]


def alarm_lines(tmp_path) -> list[dict]:
    path = tmp_path / ALARMS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("action", ["warn", "stop"])
@pytest.mark.parametrize("signal", list(STREAMS))
def test_guard_fires_once_on_a_collapsing_stream(signal, action, tmp_path, caplog):
    values, step, fragment, _ = STREAMS[signal]
    guard = make_guard(action=action)
    with caplog.at_level(logging.WARNING, logger="opd.guards"):
        state, control, sent = feed(guard, tmp_path, stream(signal, values))
    assert [(a.signal, a.step) for a in guard.alarms] == [(signal, step)]
    message = guard.alarms[0].message
    assert message.startswith(f"opd guard: {fragment}"), message
    ending = "stopping training (guard_action=stop)" if action == "stop" else "warning only"
    assert ending in message
    assert [r.getMessage() for r in caplog.records] == [message]
    [line] = alarm_lines(tmp_path)
    assert line["step"] == step and line["signal"] == signal and line["message"] == message
    assert line["value"] == values[step - 1]
    assert line["field"] == FIELDS[signal] and FIELDS[signal] in message
    assert control.should_training_stop is (action == "stop")
    # the running count reaches the logs (report_to) and the log history
    assert [logs[ALARM_COUNT_KEY] for logs in sent] == [
        int(i >= step) for i in range(1, len(values) + 1)
    ]
    assert state.log_history[step - 1][ALARM_COUNT_KEY] == 1


@pytest.mark.parametrize("signal", list(STREAMS))
def test_guard_stays_silent_on_a_healthy_stream(signal, tmp_path, caplog):
    guard = make_guard(action="stop")
    with caplog.at_level(logging.WARNING, logger="opd.guards"):
        _, control, sent = feed(guard, tmp_path, stream(signal, STREAMS[signal][3]))
    assert guard.alarms == [] and caplog.records == [] and alarm_lines(tmp_path) == []
    assert not control.should_training_stop
    assert all(logs[ALARM_COUNT_KEY] == 0 for logs in sent)


def test_thresholds_are_absolute_or_relative_to_the_start(tmp_path):
    """The file's threshold is the bound crossed: 2 x start for length, the setting for rates."""
    feed(
        guard := make_guard(),
        tmp_path,
        stream("completion_length", STREAMS["completion_length"][0]),
    )
    [alarm] = guard.alarms
    assert alarm.threshold == pytest.approx(200.0) and alarm.start == pytest.approx(100.0)
    feed(guard := make_guard(), tmp_path, stream("repetition_rate", [0.9]))
    assert guard.alarms[0].threshold == 0.3 and guard.alarms[0].start is None


def test_relative_guards_wait_for_their_start_value(tmp_path):
    # A huge early value is part of the start, not judged against it.
    guard = make_guard(start_logs=3)
    feed(guard, tmp_path, stream("completion_length", [10, 1000, 10, 10]))
    assert guard.alarms == []


def test_patience_needs_consecutive_logs(tmp_path):
    guard = make_guard(patience=2)
    feed(guard, tmp_path, stream("truncation_rate", [0.6, 0.2, 0.6, 0.7, 0.8]))
    [alarm] = guard.alarms
    assert alarm.step == 4 and "for 2 logs in a row" in alarm.message


def test_guard_fires_once_per_excursion_and_rearms(tmp_path):
    guard = make_guard()
    feed(guard, tmp_path, stream("repetition_rate", [0.5, 0.6, 0.7, 0.1, 0.4, 0.5]))
    assert [a.step for a in guard.alarms] == [1, 5]
    assert [line["step"] for line in alarm_lines(tmp_path)] == [1, 5]


def test_signals_are_independent_and_each_alarm_names_its_own(tmp_path):
    logs = [
        {KEYS["repetition_rate"]: 0.1, KEYS["truncation_rate"]: 0.1},
        {KEYS["repetition_rate"]: 0.4, KEYS["truncation_rate"]: 0.1},
        {KEYS["repetition_rate"]: 0.4, KEYS["truncation_rate"]: 0.9},
    ]
    guard = make_guard()
    _, _, sent = feed(guard, tmp_path, logs)
    assert [(a.signal, a.step) for a in guard.alarms] == [
        ("repetition_rate", 2),
        ("truncation_rate", 3),
    ]
    assert [logs[ALARM_COUNT_KEY] for logs in sent] == [0, 1, 2]


@pytest.mark.parametrize("off", [0, 0.0, None])
def test_a_zero_or_none_threshold_turns_its_guard_off(off, tmp_path):
    guard = make_guard(thresholds={**THRESHOLDS, "truncation_rate": off}, action="stop")
    _, control, _ = feed(guard, tmp_path, stream("truncation_rate", [1.0, 1.0]))
    assert guard.alarms == [] and not control.should_training_stop


def test_missing_metric_keeps_its_guard_silent(tmp_path, caplog):
    """topk_mass is logged only with teacher_top_k > 0; None is TRL's all-NaN average."""
    logs = [{KEYS["completion_length"]: 5.0}, {KEYS["topk_mass"]: None}, {}]
    guard = make_guard(action="stop")
    with caplog.at_level(logging.WARNING, logger="opd.guards"):
        state, control, _ = feed(guard, tmp_path, logs)
        guard.on_train_end(TrainingArguments(output_dir=str(tmp_path)), state, control)
    assert guard.alarms == [] and caplog.records == []  # the default topk setting: no nagging


def test_explicit_threshold_on_a_never_logged_metric_says_so(tmp_path, caplog):
    guard = make_guard(explicit=frozenset({"topk_mass"}))
    with caplog.at_level(logging.WARNING, logger="opd.guards"):
        state, control, _ = feed(guard, tmp_path, stream("truncation_rate", [0.1]))
        guard.on_train_end(TrainingArguments(output_dir=str(tmp_path)), state, control)
    [record] = caplog.records
    assert "guard_topk_mass_drop is set but opd/topk_mass was never logged" in record.getMessage()
    assert "teacher_top_k > 0" in record.getMessage()


def test_other_processes_stop_too_but_only_the_main_one_writes(tmp_path, caplog):
    guard = make_guard(action="stop")
    state = TrainerState(is_world_process_zero=False)
    with caplog.at_level(logging.WARNING, logger="opd.guards"):
        _, control, _ = feed(guard, tmp_path, stream("truncation_rate", [0.9]), state=state)
    assert control.should_training_stop and len(guard.alarms) == 1
    assert caplog.records == [] and alarm_lines(tmp_path) == []


def test_resume_keeps_start_values_and_open_excursions(tmp_path):
    """A resumed run's guard replays `state.log_history`: the start value is the first run's,
    and an excursion that already alarmed does not alarm again on resume."""
    first = make_guard()
    state, _, _ = feed(first, tmp_path, stream("completion_length", [100, 100, 100, 150, 250]))
    assert [a.step for a in first.alarms] == [5]
    history = TrainerState(global_step=4, log_history=state.log_history[:4])
    resumed = make_guard()
    feed(resumed, tmp_path / "resumed", stream("completion_length", [180, 210]), state=history)
    assert [(a.step, a.start) for a in resumed.alarms] == [(6, pytest.approx(100.0))]
    still_high = TrainerState(global_step=5, log_history=state.log_history[:5])
    again = make_guard()
    feed(again, tmp_path / "again", stream("completion_length", [260, 270]), state=still_high)
    assert [a.step for a in again.alarms] == [5]  # replayed (the count goes on), not new
    assert not (tmp_path / "again" / ALARMS_FILE).exists()


def test_a_fresh_run_replaces_the_alarms_file_a_resumed_one_appends(tmp_path):
    feed(make_guard(), tmp_path, stream("truncation_rate", [0.9]))
    state, _, _ = feed(make_guard(), tmp_path, stream("truncation_rate", [0.1, 0.8]))
    assert [line["step"] for line in alarm_lines(tmp_path)] == [2]  # not the old step 1
    feed(make_guard(), tmp_path, stream("truncation_rate", [0.1, 0.7]), state=state)  # resumed
    assert [line["step"] for line in alarm_lines(tmp_path)] == [2, 4]


# ----- configuration -----


def config(tmp_path, **overrides) -> OPDConfig:
    fields = {"output_dir": str(tmp_path), "teacher_model_name_or_path": "t", "report_to": "none"}
    return OPDConfig(**{**fields, **overrides})


def test_defaults_turn_every_guard_on_in_warn_mode(tmp_path):
    guard = CollapseGuard.from_config(config(tmp_path))
    assert [s.name for s in guard.signals] == list(KEYS)
    assert guard.action == "warn" and guard.patience == 1 and guard.start_logs == 3
    assert guard.explicit == frozenset()
    custom = CollapseGuard.from_config(
        config(tmp_path, guard_topk_mass_drop=0.3, guard_truncation_rate=0, guard_action="stop")
    )
    assert custom.explicit == {"topk_mass"} and "truncation_rate" not in custom.thresholds
    assert custom.action == "stop"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"guard_action": "halt"}, "guard_action='halt' is not one of warn, stop"),
        ({"guard_length_factor": 0.8}, "guard_length_factor must be > 1, or 0 to turn"),
        ({"guard_length_factor": -2.0}, "guard_length_factor must be > 1"),
        ({"guard_repetition_rate": 1.0}, r"guard_repetition_rate must be in \(0, 1\)"),
        ({"guard_truncation_rate": -0.1}, r"guard_truncation_rate must be in \(0, 1\)"),
        ({"guard_topk_mass_drop": 1.5}, r"guard_topk_mass_drop must be in \(0, 1\)"),
        ({"guard_topk_mass_drop": float("nan")}, "guard_topk_mass_drop must be a finite number"),
        ({"guard_patience": 0}, "guard_patience must be an integer >= 1"),
        ({"guard_start_logs": 1.5}, "guard_start_logs must be an integer >= 1"),
    ],
)
def test_config_rejects_bad_guard_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_config_accepts_guards_turned_off(tmp_path):
    off = config(tmp_path, guard_length_factor=0, guard_repetition_rate=None)
    assert CollapseGuard.from_config(off).thresholds.keys() == {"truncation_rate", "topk_mass"}
