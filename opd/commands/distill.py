"""`opd distill`: build the run from `DistillArguments` + `OPDConfig` + `StudentModelConfig`
(TRL's `ModelConfig`: `--use_peft --lora_r ...`, `--dtype`, as `trl grpo` takes them), train,
report.

With no `--config`, the embedded demo recipe (`opd/demo/default.yaml`) is used: the student
`demo:student`, the teacher `demo:teacher` and the prompts `demo:arithmetic` are built locally
(`opd/demo/pretrain.py`, cached outside the repo), so the whole loop runs on a CPU with no
download. Any field can be overridden: `opd distill --max_steps 2 --learning_rate 1e-4`.

Parsed by `opd.cli` (TRL's `TrlParser`: YAML values become defaults, flags override them).
`--reward_funcs` takes built-in names or import paths (`my_module.my_reward`), as `trl grpo`
does (`opd/rewards.py`); the prompts are shaped by the `dataset_*` fields in `opd/data.py`, as
for `opd rollout` and `opd eval`. The run's `opd_config.yaml` keeps the model names as given
(`demo:student`, `pypi:...`); only training loads them from their local folders.

Test: `pytest tests/integration/test_cli.py tests/integration/test_distill_user_inputs.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import ModelConfig

from opd.arguments import ConfigError, help_field
from opd.config import OPDConfig, resolved_config_dict, write_resolved_config
from opd.data import DATASET_NAME_HELP, DEMO_DATASET, PromptDataArguments
from opd.models import DEMO_STUDENT, resolve_model_names

# Fields a resumed run may set differently from the run that wrote the checkpoint: where it
# writes and logs, how long it runs, how it reaches a teacher server (and whether it streams to
# it during generation: same scores). Any other change (learning rate, seed, method, data,
# batch layout, ...) would make the resumed run differ from the uninterrupted one, so it is
# refused.
RESUME_MAY_CHANGE = {
    "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "report_to",
    "run_name", "project", "disable_tqdm", "dry_run", "eval_before_after", "write_report",
    "teacher_urls", "teacher_timeout_s", "teacher_retry_budget_s", "teacher_api_key",
    "teacher_overlap",
    "local_rank", "use_cpu", "ddp_backend", "ddp_timeout", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "push_to_hub",
}  # fmt: skip
RESUME_MAY_CHANGE_PREFIXES = ("logging_", "log_", "save_", "hub_", "trackio_")


@dataclass
class StudentModelConfig(ModelConfig):
    """TRL's `ModelConfig` for the student, with the demo student as the default model.

    Its flags are those of `trl grpo`: `--use_peft --lora_r --lora_alpha --lora_dropout
    --lora_target_modules --lora_modules_to_save`, `--dtype`, `--attn_implementation`,
    `--model_revision` (`--trust_remote_code` is `OPDConfig`'s, as in TRL).
    """

    model_name_or_path: str = help_field(
        DEMO_STUDENT, "Student model (path or hub name). 'demo:student' builds the demo's."
    )
    # TRL's default is 0.05. OPD compares the trainer's and the sampler's logprobs token by
    # token; LoRA dropout makes the trainer's forward noisy (measured on the tiny recipe: a max
    # logprob gap of 0.07 to vLLM instead of < 1e-4).
    lora_dropout: float = help_field(
        0.0, "LoRA dropout (0: the trainer's logprobs match the sampler's)."
    )


@dataclass(kw_only=True)
class DistillArguments(PromptDataArguments):
    """What `opd distill` needs besides the trainer and model configs: the data (the
    `dataset_*` fields of `PromptDataArguments`, as in `opd rollout` and `opd eval`), the
    rewards and the demo."""

    dataset_name: str = help_field(DEMO_DATASET, DATASET_NAME_HELP)
    dataset_train_split: str = help_field("train", "Split to train on.")
    reward_funcs: list[str] = help_field(
        help="Outcome rewards to compute and log: built-in names (demo_accuracy, "
        "math_accuracy, format) or import paths module.function, as in trl grpo.",
        default_factory=list,
    )
    eval_before_after: bool = help_field(
        False,
        "Evaluate accuracy and reverse KL on held-out demo prompts before and "
        "after training, and print the table (demo task only).",
    )
    dry_run: bool = help_field(
        False, "Parse and validate the config, write it to output_dir, and exit."
    )
    write_report: bool = help_field(
        True,
        "Draw the run's plots and report/index.html when training ends (a few seconds); "
        "`opd report <output_dir>` draws them later.",
    )


def run(
    script_args: DistillArguments,
    config: OPDConfig,
    model_args: StudentModelConfig | None = None,
) -> dict[str, Any]:
    """Train the student against the teacher; returns the before/after numbers when asked."""
    from opd.rewards import build_reward_funcs

    model_args = model_args or StudentModelConfig()
    peft_config = start_run(script_args, model_args, config)
    if script_args.dry_run:  # a dry run only validates: no demo pre-training, no model
        return {}
    from transformers import AutoTokenizer
    from trl import get_quantization_config

    from opd.teacher.build import build_teacher
    from opd.trainer import OPDTrainer

    resolve_demo_models(model_args, config)  # after the config is written: see `start_run`
    main_process = config.process_index == 0
    start = time.perf_counter()
    student = model_args.model_name_or_path
    train_dataset = None  # offline: the trainer trains on the rollouts stored in the shards
    reward_columns = None  # the dataset columns TRL passes the reward functions
    if config.teacher_mode != "offline":
        train_dataset = load_train_prompts(script_args, student)
        reward_columns = [name for name in train_dataset.column_names if name != "prompt"]
    else:
        print(f"opd: teacher_mode=offline trains on the rollouts in {config.teacher_shards}; "
              "dataset_name is not used.")  # fmt: skip
    reward_funcs = build_reward_funcs(script_args.reward_funcs, reward_columns)
    evaluate = _wants_demo_eval(script_args, config)
    teacher = tokenizer = None
    if evaluate:  # one teacher serves the trainer and both evaluations
        tokenizer = AutoTokenizer.from_pretrained(student)
        teacher = build_teacher(config, tokenizer)
        before = _evaluate_demo(student, teacher.model, tokenizer, "before")
    # After the resolved config is written, so that it keeps the flags as given.
    config.model_init_kwargs = student_init_kwargs(model_args, config)
    trainer = OPDTrainer(
        model=student,
        reward_funcs=reward_funcs or None,
        args=config,
        train_dataset=train_dataset,
        teacher=teacher,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    results: dict[str, Any] = {
        "train_wall_s": round(time.perf_counter() - start, 1),
        "num_processes": trainer.accelerator.num_processes,
        "log_history": trainer.state.log_history,
    }
    if evaluate:
        after = _evaluate_demo(trainer.model, teacher.model, tokenizer, "after")
        results.update(before=before, after=after)
        if main_process:
            print(format_before_after(before, after))
    if main_process:  # results and the plots of the run (`opd report`; never raises)
        (Path(config.output_dir) / "opd_results.json").write_text(json.dumps(results, indent=2))
        if script_args.write_report:
            from opd.report.write import write_report_after_run

            write_report_after_run(config.output_dir)
    return results


def start_run(script_args: DistillArguments, model_args: ModelConfig, config: OPDConfig):
    """Validate what can be checked before any model loads, check a resume, and write the run's
    `opd_config.yaml`; returns the PEFT config (None without `--use_peft`).

    The config is compared and written with the model names as given (`demo:student`,
    `pypi:...`), so that it reproduces the run on another machine; training then loads them from
    the local folders that `resolve_demo_models` puts in their place.
    """
    from opd.rewards import build_reward_funcs

    build_reward_funcs(script_args.reward_funcs)  # a bad name or signature fails here
    peft_config = build_peft_config(model_args)
    # Under torchrun / accelerate launch every process runs this; only the main one writes.
    main_process = config.process_index == 0
    if main_process:  # a relative output_dir is relative to the working directory, as in TRL
        print(f"opd: run folder {Path(config.output_dir).resolve()}")
    if config.resume_from_checkpoint:  # before the run's config file is rewritten
        check_resume(config, resolved_config_dict(script_args, model_args, config))
        if main_process:
            print(f"opd: resuming from {config.resume_from_checkpoint}")
    if main_process:
        config_path = write_resolved_config(config.output_dir, script_args, model_args, config)
        print(f"opd: resolved config written to {config_path}")
    return peft_config


def load_train_prompts(script_args: DistillArguments, student: str):
    """The training prompts, checked before any model loads: chat prompts (the dataset's, or
    made by dataset_chat_template / dataset_system_prompt) need the student's chat template,
    which TRL would otherwise find missing at the first step."""
    from trl import is_conversational

    from opd.prompts import load_tokenizer, require_chat_template

    train_dataset = script_args.load_prompts(script_args.dataset_train_split)
    if is_conversational(train_dataset[0]):
        require_chat_template(load_tokenizer(student))
    return train_dataset


def check_resume(config: OPDConfig, resolved: dict[str, Any]) -> None:
    """Point `config.resume_from_checkpoint` at a complete checkpoint ('true': the latest
    complete one in output_dir) and refuse settings that differ from the checkpointed run's
    (its `opd_config.yaml`, copied into each checkpoint; else the one beside the folder)."""
    from opd.trainer.resume import RUN_CONFIG, resolve_checkpoint

    wanted: str | bool = str(config.resume_from_checkpoint)
    if wanted.lower() == "true" and not Path(wanted).is_dir():
        wanted = True  # as `Trainer.train(resume_from_checkpoint=True)`, complete ones only
    checkpoint = resolve_checkpoint(wanted, config.output_dir, config.world_size)
    config.resume_from_checkpoint = checkpoint  # also what the run's opd_config.yaml records
    previous_path = Path(checkpoint) / RUN_CONFIG
    if not previous_path.is_file():
        previous_path = Path(checkpoint).parent / RUN_CONFIG
    if not previous_path.is_file():
        print(f"opd: {previous_path} not found; the settings of the run being resumed could not "
              "be compared with these.")  # fmt: skip
        return
    import yaml

    previous = yaml.safe_load(previous_path.read_text())
    changed = [
        f"{name} {previous.get(name)!r} -> {value!r}"
        for name, value in resolved.items()
        if previous.get(name) != value
        and name not in RESUME_MAY_CHANGE
        and not name.startswith(RESUME_MAY_CHANGE_PREFIXES)
    ]
    if changed:
        raise ConfigError(
            f"resume_from_checkpoint: these settings differ from the run that wrote {checkpoint} "
            f"({previous_path}): {'; '.join(changed)}. A resumed run must use the same ones to "
            "continue it; to train with new settings, start a run in a fresh output_dir."
        )


def _wants_demo_eval(script_args: DistillArguments, config: OPDConfig) -> bool:
    """The demo evaluation runs the teacher model in-process (accuracy and reverse KL)."""
    evaluate = script_args.eval_before_after and script_args.dataset_name == DEMO_DATASET
    if evaluate and config.teacher_mode != "local":
        print("opd: eval_before_after needs the teacher in-process (teacher_mode=local); skipped.")
        return False
    if evaluate and config.teacher_cross_tokenizer:
        print(
            "opd: eval_before_after compares student and teacher over one vocabulary; skipped "
            "with teacher_cross_tokenizer (scripts/experiments/cross_tokenizer_demo.py "
            "evaluates such a pair)."
        )
        return False
    return evaluate


def student_init_kwargs(model_args: ModelConfig, config: OPDConfig) -> dict[str, Any]:
    """The student's `from_pretrained` keyword arguments, merged as `trl grpo` merges them: the
    `ModelConfig` flags, overridden by `model_init_kwargs` where both set one."""
    init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": config.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    return {**init_kwargs, **(config.model_init_kwargs or {})}  # pyright: ignore[reportGeneralTypeIssues]


def build_peft_config(model_args: ModelConfig):
    """TRL's `get_peft_config` (None without `--use_peft`), refusing an adapter on the lm_head
    before any model loads: opd's loss reads `lm_head.weight` itself."""
    from peft import LoraConfig
    from trl import get_peft_config

    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return None
    assert isinstance(peft_config, LoraConfig)  # what get_peft_config builds
    targets = peft_config.target_modules
    named = [targets] if isinstance(targets, str) else list(targets or [])
    if "lm_head" in [*named, *(peft_config.modules_to_save or [])]:
        raise ConfigError(
            "an adapter on lm_head is not supported (opd's loss computes logits as "
            "hidden @ lm_head.weight): remove lm_head from lora_target_modules and "
            "lora_modules_to_save."
        )
    return peft_config


def resolve_demo_models(script_args, config: OPDConfig) -> None:
    """Replace model names opd builds itself by their local folders: `demo:*` (trained here) and
    `pypi:*` (real models assembled from PyPI packages, `opd/demo/pypi_models.py`).

    `script_args` is any object with `model_name_or_path` (a `ModelConfig`, a script's args)."""
    route_teachers = [route.partition("=")[2].strip() for route in config.teacher_routes]
    names = {script_args.model_name_or_path, config.teacher_model_name_or_path, *route_teachers}
    local_paths = resolve_model_names(names)
    if not local_paths:
        return
    script_args.model_name_or_path = local_paths.get(
        script_args.model_name_or_path, script_args.model_name_or_path
    )
    config.teacher_model_name_or_path = local_paths.get(
        config.teacher_model_name_or_path, config.teacher_model_name_or_path
    )
    config.teacher_routes = [_resolve_route(route, local_paths) for route in config.teacher_routes]


def _resolve_route(route: str, local_paths: dict[str, str]) -> str:
    name, _, teacher = route.partition("=")
    return f"{name}={local_paths.get(teacher.strip(), teacher)}"


def _evaluate_demo(student, teacher_model, tokenizer, label: str) -> dict[str, float]:
    """Accuracy and reverse KL of `student` (path or model) on the held-out demo prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.demo.evaluate import evaluate_models
    from opd.demo.pretrain import MAX_NEW_TOKENS, demo_splits

    if isinstance(student, str):
        student = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    student = student.to(teacher_model.device)
    start = time.perf_counter()
    metrics = evaluate_models(
        student.eval(), teacher_model, tokenizer, demo_splits()[1], max_new_tokens=MAX_NEW_TOKENS
    )
    print(f"opd: evaluated the student {label} training in {time.perf_counter() - start:.1f}s")
    return {key: float(value) for key, value in metrics.items()}


def format_before_after(before: dict[str, float], after: dict[str, float]) -> str:
    """The demo's closing table: the student before/after OPD, and the teacher."""
    rows = [
        ("accuracy (held-out, greedy)", "accuracy", "teacher_accuracy", "{:.1%}"),
        ("reverse KL(student||teacher)", "reverse_kl", None, "{:.3f}"),
    ]
    lines = [f"{'':32}{'before':>10}{'after':>10}{'teacher':>10}"]
    for title, key, teacher_key, fmt in rows:
        teacher = fmt.format(after[teacher_key]) if teacher_key else "0 (ref)"
        lines.append(
            f"{title:32}{fmt.format(before[key]):>10}{fmt.format(after[key]):>10}{teacher:>10}"
        )
    return "\n".join(lines)
