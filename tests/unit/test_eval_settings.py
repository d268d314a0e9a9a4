"""Which arguments of `opd eval` may change between a run and its resumption, and the context
its engines get.

Every argument field is classified once, in `opd/commands/eval.py`: `RECORDED_SETTINGS` (changes
what is measured: recorded in summary.json, a rerun with another value is refused naming the
argument) or `FREE_SETTINGS` (cannot: a rerun may change it). A new field fails
`test_every_eval_argument_is_classified` until it is classified and given a changed value below.
The resumption itself, with free settings changed: tests/integration/test_eval.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen2Config

from opd.commands import eval as eval_command
from opd.commands.eval import EvalArguments, engine_context_length, settings_record
from opd.config import ConfigError
from opd.shards import plan_differences

# A changed value for every recorded argument.
RECORDED_CHANGES = {
    "model_name_or_path": "other/student",
    "teacher_model_name_or_path": "some/teacher",
    "dataset_name": "other.jsonl",
    "dataset_config": "main",
    "dataset_split": "train",
    "dataset_prompt_column": "question",
    "dataset_answer_column": "solution",
    "dataset_chat_template": True,
    "dataset_system_prompt": "Put the final answer in \\boxed{}.",
    "dataset_prompt_template": "Question: {prompt}\nAnswer:",
    "max_examples": 3,
    "num_samples": 8,
    "temperature": 1.0,
    "top_p": 0.5,
    "max_new_tokens": 7,
    "seed": 1,
    "dtype": "bfloat16",
    "reward": "demo_accuracy",
    "k": [2],
}
# A changed value for every free argument: none of them reaches the settings record.
FREE_CHANGES = {
    "output_dir": "elsewhere",
    "chunk_size": 3,
    "vllm_max_model_length": 4096,
    "vllm_gpu_memory_utilization": 0.5,
    "vllm_tensor_parallel_size": 2,
}


def _args(**fields) -> EvalArguments:
    return EvalArguments(model_name_or_path="student", dataset_name="data.jsonl",
                         output_dir="out", **fields)  # fmt: skip


def test_every_eval_argument_is_classified():
    fields = {field.name for field in dataclasses.fields(EvalArguments)}
    recorded, free = eval_command.RECORDED_SETTINGS, eval_command.FREE_SETTINGS
    assert not recorded.keys() & free.keys()
    assert fields - recorded.keys() - free.keys() == set(), "classify these in commands/eval.py"
    assert recorded.keys() | free.keys() == fields, "classified fields that no longer exist"
    assert free.keys() == FREE_CHANGES.keys()
    # The dataset fields another change may not have added yet have a changed value ready.
    assert recorded.keys() == RECORDED_CHANGES.keys() & fields


def test_a_changed_recorded_setting_is_named_and_a_free_one_is_not_recorded():
    args = _args()
    record = settings_record(args, num_examples=10)
    for name in eval_command.RECORDED_SETTINGS:
        changed = settings_record(dataclasses.replace(args, **{name: RECORDED_CHANGES[name]}), 10)
        differences = plan_differences(record, changed, labels=eval_command.SETTING_LABELS)
        assert any(line.startswith(f"{name}: ") for line in differences), (name, differences)
    for name, value in FREE_CHANGES.items():
        assert settings_record(dataclasses.replace(args, **{name: value}), 10) == record, name
    assert record["sampling"]["dtype"] == ("auto" if torch.cuda.is_available() else "float32")
    assert "teacher" not in record["models"]  # a teacher may be added later


@pytest.fixture
def model_4096(tmp_path) -> str:
    """A model folder whose config declares a 4096-token context (the config is all it reads)."""
    Qwen2Config(max_position_embeddings=4096).save_pretrained(tmp_path)
    return str(tmp_path)


def test_engine_context_is_sized_from_the_prompts_by_default(model_4096):
    prompt_ids = [[1] * 150, [1] * 300, [1] * 20]
    short, long = _args(max_new_tokens=64), _args(max_new_tokens=4000)
    assert engine_context_length(short, "student", model_4096, prompt_ids) == 512  # 364 rounded up
    # 300 + 4000 tokens exceed the model's context: its own limit, no more.
    assert engine_context_length(long, "teacher", model_4096, prompt_ids) == 4096


def test_a_given_context_must_hold_the_longest_prompt_and_its_completion(model_4096):
    prompt_ids = [[1] * 300, [1] * 20]
    exact = _args(max_new_tokens=64, vllm_max_model_length=364)
    assert engine_context_length(exact, "student", model_4096, prompt_ids) == 364
    short = _args(max_new_tokens=64, vllm_max_model_length=363)
    with pytest.raises(ConfigError) as error:
        engine_context_length(short, "teacher", model_4096, prompt_ids)
    assert str(error.value) == (
        "vllm_max_model_length=363 would cut completions short: the longest prompt has 300 "
        "tokens (teacher's tokenizer), plus max_new_tokens=64; raise it to 364 or leave it unset "
        "(then it is sized from the prompts)."
    )
    # Past the model's own limit, the limit is enough: the model would cut there anyway.
    at_limit = _args(max_new_tokens=4000, vllm_max_model_length=4096)
    assert engine_context_length(at_limit, "student", model_4096, prompt_ids) == 4096
    with pytest.raises(ConfigError, match=r"longest prompt has 4096 tokens \(student's tokenizer"):
        engine_context_length(_args(), "student", model_4096, [[1] * 4096])
