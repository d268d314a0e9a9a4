"""`opd sft`: stage 1 of the sequential SFT -> OPD baseline (METHODS.md section 10, CHORD
paragraph): supervised fine-tuning of the student on a recipe's expert traces with TRL's
`SFTTrainer`; stage 2 is `opd distill --model_name_or_path <sft_output_dir>` on the same recipe.

    opd sft --config recipes/sft_then_opd.yaml [--sft_max_steps N] [--sft_learning_rate LR] ...
    opd distill --config recipes/sft_then_opd.yaml --model_name_or_path <sft_output_dir>

What it computes. Each row of the recipe's prompt dataset becomes one prompt-completion pair:
the prompt exactly as `opd distill` shows it (the `dataset_*` fields: text, or chat messages
rendered with the student's chat template) and the completion = the row's trace (column
`sft_trace_column`, default the recipe's `opd_imitation_column`, then `opd_trace_column`, else
`answer`; with chat prompts an assistant message). TRL trains on the completion tokens only
(its prompt-completion format, `completion_only_loss`), the end-of-sequence token included
(TRL appends EOS to text completions; the chat template closes the assistant turn):

    L_SFT = -(1/N) sum_i sum_{t in completion_i} log pi_student(y_t | x_i, y_<t),

with N the number of completion tokens in the batch (transformers' `num_items_in_batch`).

Where the settings come from. The recipe is read exactly as `opd distill` reads it (the same
`TrlParser`, the same unknown-key check), so one file holds both stages; `opd sft` uses the
student (`model_name_or_path`, `dtype`, `model_init_kwargs`), the data (`dataset_*`), the batch
layout (`per_device_train_batch_size`, `gradient_accumulation_steps`), `seed`, `bf16`/`fp16`,
`gradient_checkpointing` and the logging fields, and ignores the rest (teacher, OPD objective,
vLLM, `use_peft`: SFT trains all weights). Its own fields are the `sft_*` flags; their defaults
are TRL's `SFTConfig` defaults (lr 2e-5, `max_length` 1024, linear decay without warmup) and
transformers' 3 epochs. The `sft_*` fields are flags, not recipe keys: `opd distill` refuses keys
it does not know, so a recipe shared by both stages cannot hold them; a recipe's header gives the
`opd sft` command with its flags.

The folder. `sft_output_dir` (default: the recipe's `output_dir` + `-sft`) gets the model and
tokenizer (`save_pretrained`), then `opd_sft.json` (the settings and the training log), written
last: its presence marks a finished model. A rerun with the same settings skips the training
(one line); with other settings it is refused, naming them. No intermediate checkpoints and no
resume: an interrupted run starts over.

Test: `pytest -n 0 tests/integration/test_sft_then_opd.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.arguments import ConfigError, help_field

if TYPE_CHECKING:  # loaded with the run, not for `--help` or parsing
    from datasets import Dataset

DESCRIPTION = (
    "Supervised fine-tuning on a recipe's expert traces (TRL SFTTrainer, loss on the traces "
    "only): stage 1 of SFT -> OPD. Reads the recipe `opd distill` reads; then run "
    "`opd distill --config RECIPE --model_name_or_path SFT_OUTPUT_DIR`."
)
MARKER = "opd_sft.json"  # written last: a finished SFT model
DEFAULT_TRACE_COLUMN = "answer"


@dataclass
class SftArguments:
    """`opd sft`'s flags: the recipe, the SFT-only settings, and two recipe fields it may
    override (`None`: the recipe's value)."""

    config: str | None = help_field(
        None, "Recipe YAML, the one `opd distill` reads (default: the embedded demo recipe)."
    )
    sft_output_dir: str | None = help_field(
        None, "Where the SFT model and tokenizer go (default: the recipe's output_dir + '-sft')."
    )
    sft_trace_column: str | None = help_field(
        None,
        "Dataset column holding the expert traces (default: the recipe's opd_imitation_column, "
        f"then opd_trace_column, else '{DEFAULT_TRACE_COLUMN}').",
    )
    sft_max_steps: int = help_field(-1, "SFT optimizer steps (-1: sft_num_train_epochs).")
    sft_num_train_epochs: float = help_field(3.0, "SFT passes over the traces (transformers').")
    sft_learning_rate: float = help_field(2e-5, "SFT peak learning rate (TRL SFTConfig's).")
    sft_max_length: int | None = help_field(
        1024, "Longest prompt + trace in tokens; longer ones are cut at the end (TRL's default)."
    )
    model_name_or_path: str | None = help_field(
        None, "Model to fine-tune (default: the recipe's model_name_or_path)."
    )
    dataset_name: str | None = help_field(None, "Prompts and traces (default: the recipe's).")
    debug: bool = help_field(False, "Show the traceback of a configuration error.")

    def __post_init__(self):
        if self.sft_max_steps == 0 or self.sft_max_steps < -1:
            raise ValueError(f"sft_max_steps must be >= 1 or -1, got {self.sft_max_steps}.")
        if self.sft_learning_rate <= 0 or self.sft_num_train_epochs <= 0:
            raise ValueError("sft_learning_rate and sft_num_train_epochs must be > 0.")


def run(args: SftArguments) -> dict[str, Any]:
    """Fine-tune the recipe's student on its traces into `sft_output_dir` (skipped when that
    folder already holds the finished model of these settings); returns the training log."""
    script_args, config, model_args = read_recipe(args)
    output_dir = Path(args.sft_output_dir or f"{config.output_dir.rstrip('/')}-sft")
    trace_column = (
        args.sft_trace_column
        or config.opd_imitation_column  # CHORD's traces: the same stream, trained first
        or config.opd_trace_column
        or DEFAULT_TRACE_COLUMN
    )
    settings = sft_settings(args, script_args, config, model_args, trace_column)
    main_process = config.process_index == 0
    if is_finished(output_dir, settings):
        if main_process:
            print(f"opd sft: {output_dir} already holds the finished SFT model of these settings "
                  f"({MARKER}); skipped. Next: {next_command(args, output_dir)}")  # fmt: skip
        return {}
    from trl import SFTTrainer

    from opd.commands.distill import load_train_prompts, student_init_kwargs
    from opd.models import resolve_model_name

    if model_args.use_peft and main_process:
        print("opd sft: use_peft applies to the distill stage; SFT trains all weights.")
    student = resolve_model_name(model_args.model_name_or_path)
    assert student is not None  # StudentModelConfig always names one
    prompts = load_train_prompts(script_args, student)  # checks a chat template where needed
    start = time.perf_counter()
    sft_config = build_sft_config(args, config, output_dir)
    sft_config.model_init_kwargs = student_init_kwargs(model_args, config)
    trainer = SFTTrainer(
        model=student, args=sft_config, train_dataset=build_sft_dataset(prompts, trace_column)
    )
    trainer.train()
    trainer.save_model(str(output_dir))  # model and tokenizer
    results = {
        "settings": settings,
        "train_wall_s": round(time.perf_counter() - start, 1),
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        from opd.shards import atomic_write_bytes

        atomic_write_bytes(output_dir / MARKER, json.dumps(results, indent=2).encode())
        print(f"opd sft: SFT model written to {output_dir}. Next: {next_command(args, output_dir)}")
    return results


def read_recipe(args: SftArguments) -> tuple[Any, Any, Any]:
    """`(DistillArguments, OPDConfig, StudentModelConfig)` of the recipe, parsed and validated
    as `opd distill` parses them, with this command's two overrides applied."""
    from opd.commands.distill import DistillArguments, StudentModelConfig
    from opd.commands.recipe import parse_distill
    from opd.config import OPDConfig

    argv = ["--config", args.config] if args.config else []
    for name in ("model_name_or_path", "dataset_name"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", getattr(args, name)]
    types = (DistillArguments, OPDConfig, StudentModelConfig)
    try:
        parsed = parse_distill(types, argv, "The recipe opd sft reads.")
    except (ValueError, FileNotFoundError) as error:  # the recipe: keys, values, combinations
        raise ConfigError(f"recipe {args.config or 'opd/demo/default.yaml'}: {error}") from error
    return tuple(parsed)


def sft_settings(args: SftArguments, script_args, config, model_args, trace_column: str):
    """Everything that determines the SFT model, by the name of the field that sets it (models
    as given: `demo:student`, not its cache folder)."""
    data_fields = (
        "dataset_name", "dataset_config", "dataset_train_split", "dataset_prompt_column",
        "dataset_chat_template", "dataset_system_prompt", "dataset_prompt_template",
    )  # fmt: skip
    trainer_fields = (
        "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "bf16", "fp16",
    )  # fmt: skip
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "dtype": model_args.dtype,
        **{name: getattr(script_args, name) for name in data_fields},
        "sft_trace_column": trace_column,
        **{name: getattr(args, name) for name in (
            "sft_max_steps", "sft_num_train_epochs", "sft_learning_rate", "sft_max_length")},
        **{name: getattr(config, name) for name in trainer_fields},
    }  # fmt: skip


def is_finished(output_dir: Path, settings: dict[str, Any]) -> bool:
    """Whether `output_dir` holds a finished SFT model of `settings`; one of other settings is
    refused (reusing it would skip the training asked for)."""
    from opd.shards import plan_differences

    marker = output_dir / MARKER
    if not marker.is_file():
        return False
    stored = json.loads(marker.read_text())["settings"]
    differences = plan_differences(stored, json.loads(json.dumps(settings)))
    if differences:
        raise ConfigError(
            f"sft_output_dir {output_dir} already holds an SFT model of other settings ("
            + "; ".join(differences)
            + "). Choose another sft_output_dir (or delete this one to train again)."
        )
    return True


def build_sft_dataset(prompts: Dataset, trace_column: str) -> Dataset:
    """TRL's prompt-completion dataset: `prompt` as given, `completion` the row's trace (an
    assistant message when the prompts are chat messages). Every trace must be non-empty text.

    Args:
        prompts: the recipe's prompt dataset (`prompt` column, text or chat messages).
        trace_column: the column holding the expert traces.
    """
    from datasets import Dataset
    from trl import is_conversational

    if trace_column not in prompts.column_names:
        raise ConfigError(
            f"sft_trace_column={trace_column!r} is not a column of the dataset (columns: "
            f"{', '.join(prompts.column_names)}); set sft_trace_column (or the recipe's "
            "opd_trace_column) to the column holding the expert traces."
        )
    traces_N = prompts[trace_column]
    for row, trace in enumerate(traces_N):
        if not isinstance(trace, str) or not trace:
            raise ConfigError(
                f"sft_trace_column={trace_column!r}: row {row} holds {trace!r}, not the text "
                "of a trace; every row needs one."
            )
    completions_N: list[Any] = traces_N
    if is_conversational(prompts[0]):
        completions_N = [[{"role": "assistant", "content": trace}] for trace in traces_N]
    return Dataset.from_dict({"prompt": prompts["prompt"], "completion": completions_N})


def build_sft_config(args: SftArguments, config, output_dir: Path):
    """TRL's `SFTConfig`: the `sft_*` fields, the recipe's batch layout, precision and logging,
    and TRL's defaults for the rest. Saved once, at the end (`save_strategy` "no")."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=args.sft_max_steps,
        num_train_epochs=args.sft_num_train_epochs,
        learning_rate=args.sft_learning_rate,
        max_length=args.sft_max_length,
        completion_only_loss=True,  # TRL's prompt-completion default, stated: traces only
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        gradient_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        logging_first_step=config.logging_first_step,
        report_to=config.report_to,
        disable_tqdm=config.disable_tqdm,
        use_cpu=config.use_cpu,
        save_strategy="no",
    )


def next_command(args: SftArguments, output_dir: Path) -> str:
    """The stage-2 command for this SFT model."""
    config = f" --config {args.config}" if args.config else ""
    return f"opd distill{config} --model_name_or_path {output_dir}"
