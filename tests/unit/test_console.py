"""The training console (`opd/trainer/console.py`): one compact line per logging event, written
above an intact progress bar, with warnings on their own lines; only the main process prints.

The callbacks run on real `TrainingArguments`, `TrainerState` and `TrainerControl`, fed the logs
dict of a real demo run (transformers generation, 2 steps); a whole `opd distill` run's console
is checked in `tests/integration/test_guards.py`.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from transformers import (
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from opd.trainer.console import (
    CompactPrinterCallback,
    CompactProgressCallback,
    console_logging,
    format_log_line,
    use_compact_console,
)

# What TRL and opd logged at step 2 of a demo run (`opd distill --config
# recipes/vanilla_opd-tiny.yaml --use_vllm false`), less a few of the 30-odd keys.
STEP_LOGS = {
    "loss": 1.505, "grad_norm": 65.75, "learning_rate": 0.001, "num_tokens": 96.0,
    "completions/mean_length": 1.0, "completions/clipped_ratio": 1.0, "reward": 0.0,
    "reward_std": 0.0, "opd/reverse_kl_k1": 1.50512, "opd/teacher_logprob": -2.064,
    "opd/advantage_mean": -1.505, "opd/loss": 1.505, "step_time": 1.3431, "epoch": 0.005714,
    "guard/alarms": 1,
}  # fmt: skip
STEP_LINE = (
    "step 2/4 | loss 1.505 | reverse_kl 1.505 | reward 0 | length 1 | 1.34 s/step | alarms 1"
)
SUMMARY_LOGS = {
    "train_runtime": 2.439, "train_samples_per_second": 6.561, "train_steps_per_second": 0.82,
    "train_loss": 1.184, "epoch": 0.005714,
}  # fmt: skip


def test_step_line_shows_the_chosen_metrics_only():
    assert format_log_line(STEP_LOGS, step=2, max_steps=4) == STEP_LINE


def test_no_alarm_count_until_an_alarm_and_missing_keys_are_left_out():
    logs = {"loss": 0.25, "reward": 0.5, "guard/alarms": 0}
    assert format_log_line(logs, step=3, max_steps=10) == "step 3/10 | loss 0.25 | reward 0.5"


def test_evaluation_and_end_of_training_lines():
    eval_logs = {"eval_loss": 0.5, "eval_opd/reverse_kl_k1": 0.125, "eval_runtime": 3.0}
    assert (
        format_log_line(eval_logs, step=4, max_steps=4)
        == "eval at step 4/4 | loss 0.5 | reverse_kl 0.125"
    )
    assert (
        format_log_line(SUMMARY_LOGS, step=2, max_steps=4)
        == "done: 2 steps in 2.4 s, mean loss 1.184"
    )


def _state(*, main: bool) -> TrainerState:
    state = TrainerState(max_steps=4, is_world_process_zero=main, is_local_process_zero=main)
    state.global_step = 2
    return state


@pytest.fixture(scope="module")
def training_args(tmp_path_factory):
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("run")), report_to="none")


def _trainer(training_args, *, main: bool = True) -> SimpleNamespace:
    """What `console_logging` reads of a trainer (a real one needs models: the whole run is in
    tests/integration/test_guards.py)."""
    return SimpleNamespace(args=training_args, is_world_process_zero=lambda: main)


def test_progress_callback_writes_one_line_per_log_and_warnings_on_their_own(training_args, capsys):
    callback, state, control = CompactProgressCallback(), _state(main=True), TrainerControl()
    warning = "opd guard: truncation_rate at step 2 is 1.0, above guard_truncation_rate 0.5"
    with console_logging(_trainer(training_args)):  # as OPDTrainer.train runs
        callback.on_train_begin(training_args, state, control)
        callback.on_log(training_args, state, control, logs=dict(STEP_LOGS))
        logging.getLogger("opd.guards").warning(warning)  # as CollapseGuard.on_log sends it
        callback.on_log(training_args, state, control, logs=dict(SUMMARY_LOGS))
        callback.on_train_end(training_args, state, control)
    out, err = capsys.readouterr()
    assert out.splitlines() == [STEP_LINE, "done: 2 steps in 2.4 s, mean loss 1.184"]
    # tqdm clears the bar ("\r   \r") before the warning and redraws it after: the warning is
    # the whole of what its line shows, not text glued after the bar
    shown_lines = [line.split("\r")[-1] for line in err.split("\n")]
    assert warning in shown_lines, err
    assert "{'loss'" not in out + err


def test_console_logging_is_restored_even_when_training_raises(training_args):
    root_handlers = list(logging.getLogger().handlers)
    with pytest.raises(RuntimeError), console_logging(_trainer(training_args)):
        assert logging.getLogger().handlers != root_handlers  # tqdm's handler meanwhile
        raise RuntimeError("a step failed")
    assert logging.getLogger().handlers == root_handlers


def test_console_logging_leaves_other_processes_and_no_bar_alone(training_args):
    root_handlers = list(logging.getLogger().handlers)
    no_bar = TrainingArguments(output_dir=training_args.output_dir, disable_tqdm=True)
    for trainer in (_trainer(training_args, main=False), _trainer(no_bar)):
        with console_logging(trainer):
            assert logging.getLogger().handlers == root_handlers


@pytest.mark.parametrize("callback_class", [CompactProgressCallback, CompactPrinterCallback])
def test_other_processes_print_nothing(callback_class, training_args, capsys):
    callback, state, control = callback_class(), _state(main=False), TrainerControl()
    callback.on_train_begin(training_args, state, control)
    callback.on_log(training_args, state, control, logs=dict(STEP_LOGS))
    callback.on_train_end(training_args, state, control)
    assert capsys.readouterr() == ("", "")


def test_printer_callback_prints_the_compact_line(training_args, capsys):
    state, control = _state(main=True), TrainerControl()
    CompactPrinterCallback().on_log(training_args, state, control, logs=dict(STEP_LOGS))
    assert capsys.readouterr().out == STEP_LINE + "\n"


class _OwnProgressCallback(ProgressCallback):
    """A printer the user chose (a subclass): left as it is."""


def test_use_compact_console_swaps_the_default_printers_in_place():
    """A stand-in trainer holding a real callback list: only `callback_handler.callbacks` is
    read (the swap on a real `OPDTrainer` runs in `tests/integration/test_guards.py`)."""
    flow, other = DefaultFlowCallback(), _OwnProgressCallback()
    for printer, compact in [
        (ProgressCallback(), CompactProgressCallback),
        (PrinterCallback(), CompactPrinterCallback),
    ]:
        trainer = SimpleNamespace(
            callback_handler=SimpleNamespace(callbacks=[flow, printer, other])
        )
        use_compact_console(trainer)
        callbacks = trainer.callback_handler.callbacks
        assert callbacks[0] is flow and callbacks[2] is other
        assert type(callbacks[1]) is compact
