"""`opd eval`: sample n completions per example with vLLM, grade them, report mean@n and pass@k.

    opd eval --model_name_or_path STUDENT --dataset_name DATA --output_dir EVAL \
        [--teacher_model_name_or_path TEACHER] [--num_samples 4] [--k 1 4] \
        [--max_new_tokens 1024] [--reward math_accuracy|demo_accuracy] [--max_examples N]

For each model (the student, then the teacher with identical settings): prompts are tokenized by
that model's tokenizer as TRL's GRPOTrainer and `opd rollout` do; vLLM samples `num_samples`
completions per example, a chunk of examples at a time under a progress bar; the grader marks
each completion right or wrong against the gold answer; each chunk's records are appended to
`<label>_results.jsonl`. At the end `summary.json` holds the settings and every model's metrics
(`metrics.py`: mean@n, pass@k, mean length, truncation rate), and a table shows the models side
by side. Files and resumption: `results.py`; sampling: `generate.py`.

vLLM's context is sized from the longest prompt + max_new_tokens (`engine_context_length`). A
rerun resumes if no `RECORDED_SETTINGS` argument changed, and may add a teacher to a student.

The demo: `opd eval --model_name_or_path demo:student --teacher_model_name_or_path demo:teacher
--dataset_name demo:arithmetic --reward demo_accuracy --output_dir EVAL --max_new_tokens 4`.

Test: `pytest tests/unit/test_eval_metrics.py tests/integration/test_eval.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opd.arguments import ConfigError, check_at_least_one, help_field
from opd.data import PromptDataArguments
from opd.evaluation.generate import OpenGenerator, open_vllm_generator
from opd.evaluation.metrics import format_table, summarize
from opd.evaluation.results import PROG, EvalStore, example_record, results_name

GRADERS = ("math_accuracy", "demo_accuracy")

# Every argument that changes what is measured -> its key in summary.json's settings. A rerun
# into the same output_dir with another value is refused, naming the argument: its results would
# mix with the folder's. Exception: a model may be added (a teacher next to a finished student).
RECORDED_SETTINGS = {
    "model_name_or_path": "models.student",  # as given (`pypi:*`), not its cache folder
    "teacher_model_name_or_path": "models.teacher",
    "dataset_name": "dataset.dataset_name",  # the dataset_* fields: which examples, how rendered
    "dataset_config": "dataset.dataset_config",
    "dataset_split": "dataset.dataset_split",
    "dataset_prompt_column": "dataset.dataset_prompt_column",
    "dataset_answer_column": "dataset.dataset_answer_column",
    "dataset_chat_template": "dataset.dataset_chat_template",
    "dataset_system_prompt": "dataset.dataset_system_prompt",
    "dataset_prompt_template": "dataset.dataset_prompt_template",
    "max_examples": "dataset.max_examples",
    "num_samples": "sampling.num_samples",  # the sampled distribution and its length limit
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "max_new_tokens": "sampling.max_new_tokens",
    "seed": "sampling.seed",
    "dtype": "sampling.dtype",  # resolved ('auto' is float32 on CPU): other logits
    "reward": "reward",  # the grader
    "k": "k",  # the pass@k fields of every results line
}
# Every argument that cannot change what is measured: a rerun may change it. The vLLM ones lay
# the work out (batch, KV cache, GPUs). On a GPU vLLM is not batch-invariant, so another value
# can change a sample at the rounding level, as another machine can: the same distribution.
FREE_SETTINGS = {
    "output_dir": "the evaluation being resumed",
    "chunk_size": "examples per vLLM call; each example's seeds do not depend on its chunk",
    "vllm_max_model_length": "checked to cut no completion (`engine_context_length`)",
    "vllm_gpu_memory_utilization": "KV-cache room on a GPU: how many samples run at once",
    "vllm_tensor_parallel_size": "how many GPUs each model's layers are split over",
}
SETTING_LABELS = {key: name for name, key in RECORDED_SETTINGS.items()}


@dataclass(kw_only=True)
class EvalArguments(PromptDataArguments):
    """Arguments of `opd eval` (the `dataset_*` fields are `opd distill`'s, plus the split and
    the answer column)."""

    model_name_or_path: str = help_field(
        help="Student model: path, hub name, or 'demo:student' / 'pypi:*' (as in distill)."
    )
    output_dir: str = help_field(
        help="Folder for <label>_results.jsonl per model and summary.json."
    )
    teacher_model_name_or_path: str | None = help_field(
        None,
        "Optional teacher, evaluated after the student with identical settings and "
        "shown side by side; 'demo:teacher' / 'pypi:*' as for the student.",
    )
    dataset_split: str = help_field(
        "test", "Split to evaluate (hub datasets and the demo; a local file is one)."
    )
    dataset_answer_column: str = help_field(
        "answer", "Column holding the gold answer (GSM8K '... #### 72', \\boxed{}, value)."
    )
    max_examples: int | None = help_field(
        None, "Evaluate only the first N examples (default: all)."
    )
    reward: str = help_field(
        "math_accuracy",
        "Grader: 'math_accuracy' (math-verify on the \\boxed{} or '####' answer) or "
        "'demo_accuracy' (the demo task's exact sum).",
    )
    num_samples: int = help_field(4, "Completions per example (n).")
    k: list[int] = help_field(
        help="The k of each pass@k to report, each <= num_samples; [] means 1 and n.",
        default_factory=list,
    )
    temperature: float = help_field(0.6, "Sampling temperature (0: greedy, with num_samples 1).")
    top_p: float = help_field(0.95, "Nucleus sampling threshold.")
    max_new_tokens: int = help_field(1024, "Token limit per completion; longer ones are truncated.")
    seed: int = help_field(0, "Base seed of every example's sampling seed.")
    chunk_size: int = help_field(
        128, "Examples per vLLM call; results are written after each chunk."
    )
    dtype: str = help_field(
        "auto", "vLLM dtype. 'auto': float32 on CPU, the checkpoint's dtype on GPU."
    )
    vllm_max_model_length: int | None = help_field(
        None,
        "vLLM max_model_len (prompt + completion tokens); at least the longest "
        "prompt + max_new_tokens. Default: that, rounded up to a multiple of 256.",
    )
    vllm_gpu_memory_utilization: float = help_field(0.9, "Fraction of GPU memory vLLM may take.")
    vllm_tensor_parallel_size: int = help_field(
        1, "GPUs to shard each model over (vLLM tensor parallelism)."
    )

    def __post_init__(self):
        super().__post_init__()
        check_at_least_one(
            self, "num_samples", "max_new_tokens", "chunk_size", "vllm_tensor_parallel_size",
            "max_examples",
        )  # fmt: skip
        if self.reward not in GRADERS:
            raise ConfigError(
                f"reward={self.reward!r} is not a grader; choose one of: {', '.join(GRADERS)}."
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1].")
        if self.temperature == 0 and self.num_samples > 1:
            raise ConfigError(
                f"temperature=0 (greedy) gives {self.num_samples} identical samples; set "
                "num_samples=1 or a temperature > 0."
            )
        self.k = sorted(set(self.k or [1, self.num_samples]))
        too_large = [k for k in self.k if not 1 <= k <= self.num_samples]
        if too_large:
            raise ConfigError(
                f"k={too_large}: pass@k needs 1 <= k <= num_samples={self.num_samples} "
                "(k completions are drawn from the n sampled); raise num_samples or lower k."
            )

    def models(self) -> dict[str, str]:
        """The models to evaluate, in order, by label: the student, then the teacher if any."""
        models = {"student": self.model_name_or_path}
        if self.teacher_model_name_or_path is not None:
            models["teacher"] = self.teacher_model_name_or_path
        return models


DESCRIPTION = (
    "Evaluate a student (and optionally a teacher, side by side) on a dataset: vLLM samples, "
    "math-verify grades, mean@n / pass@k / length / truncation are reported."
)


def run(args: EvalArguments, open_generator: OpenGenerator = open_vllm_generator) -> dict[str, Any]:
    """Evaluate every model of `args` into `args.output_dir`; returns the summary."""
    dataset = load_eval_dataset(args)
    model_paths = resolve_model_paths(args.models())
    # Every model's prompts are tokenized (and checked) before any engine starts.
    prompts = list(dataset["prompt"])
    prompt_ids = {
        label: tokenize_prompts(label, path, prompts) for label, path in model_paths.items()
    }
    context = {
        label: engine_context_length(args, label, path, prompt_ids[label])
        for label, path in model_paths.items()
    }
    store = EvalStore(args.output_dir, settings_record(args, len(dataset)), SETTING_LABELS)
    store.start()
    models: dict[str, Any] = {}
    for label, path in model_paths.items():
        records = evaluate_model(
            args, label, path, context[label], dataset, prompt_ids[label], store, open_generator
        )
        columns = ("correct", "num_tokens", "truncated")  # summarize's per-example lists
        metrics = summarize(*([record[key] for record in records] for key in columns), args.k)
        models[label] = {
            "model": args.models()[label],
            "results": results_name(label),
            "metrics": metrics,
        }
        store.write_summary(models, complete=False)
    summary = store.write_summary(models, complete=True)
    print(format_table(summary))
    print(f"{PROG}: results and summary.json -> {args.output_dir}")
    return summary


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def load_eval_dataset(args: EvalArguments):
    """The examples to evaluate: `prompt` (text or messages) and the gold answer column."""
    dataset = args.load_prompts(args.dataset_split)
    if args.dataset_answer_column not in dataset.column_names:
        raise ConfigError(
            f"dataset {args.dataset_name!r} has no column {args.dataset_answer_column!r} "
            f"(columns: {', '.join(dataset.column_names)}); set dataset_answer_column."
        )
    if args.max_examples is not None and args.max_examples < len(dataset):
        dataset = dataset.select(range(args.max_examples)).flatten_indices()
    return dataset


def resolve_model_paths(models: dict[str, str]) -> dict[str, str]:
    """Names opd builds itself (`demo:student`, `demo:teacher`, `pypi:*`) become their local
    folders, as in `opd distill`; other names are kept."""
    from opd.models import resolve_model_names

    local_paths = resolve_model_names(set(models.values()))
    return {label: local_paths.get(name, name) for label, name in models.items()}


def tokenize_prompts(label: str, path: str, prompts: list) -> list[list[int]]:
    from transformers import AutoTokenizer

    from opd.prompts import encode_prompt

    field = "model_name_or_path" if label == "student" else "teacher_model_name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise ConfigError(f"{field}={path!r}: {error}") from error
    return [encode_prompt(tokenizer, prompt) for prompt in prompts]


def engine_context_length(
    args: EvalArguments, label: str, path: str, prompt_ids: list[list[int]]
) -> int:
    """vLLM's context for one model: sized from the prompts and max_new_tokens by default; a
    user's vllm_max_model_length must cut no completion that the model's own limit would not,
    so that it cannot change the results (`FREE_SETTINGS`)."""
    from opd.rollout.engine import fitted_context_length, model_context_limit

    longest = max(len(ids) for ids in prompt_ids)
    model_limit = model_context_limit(path)
    if model_limit is not None and longest >= model_limit:
        raise ConfigError(
            f"the longest prompt has {longest} tokens ({label}'s tokenizer), at least the "
            f"{model_limit}-token context of the {label} model; shorten the prompts."
        )
    requested = args.vllm_max_model_length
    if requested is None:
        return fitted_context_length(longest, args.max_new_tokens, model_limit)
    needed = longest + args.max_new_tokens
    needed = needed if model_limit is None else min(needed, model_limit)
    if requested < needed:
        raise ConfigError(
            f"vllm_max_model_length={requested} would cut completions short: the longest prompt "
            f"has {longest} tokens ({label}'s tokenizer), plus max_new_tokens="
            f"{args.max_new_tokens}; raise it to {needed} or leave it unset (then it is sized "
            "from the prompts)."
        )
    return requested


def settings_record(args: EvalArguments, num_examples: int) -> dict[str, Any]:
    """What defines the results (`RECORDED_SETTINGS`): a rerun into the same output_dir must
    match it, but may add a model."""
    from opd.rollout.engine import resolve_dtype

    values = asdict(args) | {"dtype": resolve_dtype(args.dtype)}
    record: dict[str, Any] = {}
    for name, key in RECORDED_SETTINGS.items():
        section, _, leaf = key.rpartition(".")
        (record.setdefault(section, {}) if section else record)[leaf] = values[name]
    record["models"] = args.models()  # only the models evaluated: no `teacher: null`
    record["dataset"]["num_examples"] = num_examples
    return record


# ------------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------------


def evaluate_model(
    args: EvalArguments,
    label: str,
    path: str,
    context_length: int,
    dataset,
    prompt_ids: list[list[int]],
    store: EvalStore,
    open_generator: OpenGenerator,
) -> list[dict[str, Any]]:
    """Sample and grade every example not yet in `label`'s results file, with an engine of
    `context_length` tokens; returns all records in example order."""
    from tqdm import tqdm

    prompts, golds = list(dataset["prompt"]), list(dataset[args.dataset_answer_column])
    records = store.finished(label, prompts)
    todo = [index for index in range(len(dataset)) if index not in records]
    print(f"{PROG}: {label} ({path}): {len(records)} of {len(dataset)} examples already done.")
    if not todo:
        return [records[index] for index in range(len(dataset))]
    grader = load_grader(args.reward)
    desc = f"{label} ({Path(args.models()[label]).name})"
    engine = open_generator(path, args, context_length)
    with engine as generate, tqdm(total=len(todo), desc=desc, unit="ex") as bar:
        for start in range(0, len(todo), args.chunk_size):
            chunk = todo[start : start + args.chunk_size]
            samples = generate([prompt_ids[index] for index in chunk], chunk)
            assert len(samples) == len(chunk), "one list of samples per prompt"
            assert all(len(example) == args.num_samples for example in samples), "n per prompt"
            new_records = [
                example_record(index, prompts[index], golds[index], example, grader, args.k)
                for index, example in zip(chunk, samples, strict=True)
            ]
            store.append(label, new_records)
            records.update((record["index"], record) for record in new_records)
            bar.update(len(chunk))
    return [records[index] for index in range(len(dataset))]


def load_grader(name: str):
    """The reward function that grades: `fn(completions, answer=golds) -> [1.0 | 0.0 | None]`."""
    match name:
        case "math_accuracy":
            from opd.rewards import math_accuracy_reward

            return math_accuracy_reward
        case "demo_accuracy":
            from opd.demo.task import accuracy_reward

            return accuracy_reward
    raise ConfigError(f"reward={name!r} is not a grader.")
