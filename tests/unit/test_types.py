"""The stage contract in `opd/types.py`: valid construction, and each check's ValueError message.

Data enters these dataclasses over HTTP, from disk and from vLLM, so every shape and dtype check is
exercised here with its exact message.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from opd.types import LossOutput, RolloutBatch, TeacherScores

B, T, K = 2, 3, 4


def rollout(**overrides) -> RolloutBatch:
    fields = {
        "prompt_ids": [[1, 5, 6], [1, 7]],
        "completion_ids_BT": torch.tensor([[3, 4, 2], [5, 2, 0]]),
        "completion_mask_BT": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "sampler_logprobs_BT": torch.full((B, T), -0.5),
        "stop_reason_B": ["length", "stop"],
        "policy_version": 7,
    }
    fields.update(overrides)
    return RolloutBatch(**fields)


def scores(**overrides) -> TeacherScores:
    fields = {
        "sampled_logprobs_BT": torch.full((B, T), -1.0),
        "completion_mask_BT": torch.ones(B, T, dtype=torch.int64),
        "topk_ids_BTK": torch.arange(B * T * K, dtype=torch.int32).reshape(B, T, K),
        "topk_logprobs_BTK": torch.tensor([-0.1, -2.0, float("-inf"), float("-inf")]).expand(
            B, T, K
        ),
        "teacher_id": "tiny-teacher",
        "temperature": 0.7,
    }
    fields.update(overrides)
    return TeacherScores(**fields)


def raises(message: str):
    """pytest.raises(ValueError) matching `message` literally."""
    return pytest.raises(ValueError, match=re.escape(message))


# --- RolloutBatch -----------------------------------------------------------------------------


def test_rollout_batch_valid() -> None:
    batch = rollout()
    assert batch.policy_version == 7
    assert batch.completion_lengths_B() == [3, 2]
    assert batch.teacher_context_ids == [[1, 5, 6], [1, 7]]


def test_rollout_batch_minimal_and_int32_ids() -> None:
    batch = RolloutBatch(
        prompt_ids=[[1]],
        completion_ids_BT=torch.tensor([[4, 2]], dtype=torch.int32),
        completion_mask_BT=torch.tensor([[1, 0]]),
    )
    assert batch.sampler_logprobs_BT is None
    assert batch.stop_reason_B is None
    assert batch.policy_version == 0
    assert batch.completion_lengths_B() == [1]


def test_rollout_batch_teacher_context_prefers_teacher_prompt() -> None:
    teacher_prompts = [[1, 9, 9, 5, 6], [1, 9, 9, 7]]
    assert rollout(teacher_prompt_ids=teacher_prompts).teacher_context_ids == teacher_prompts


def test_rollout_batch_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        rollout().policy_version = 8  # type: ignore[misc]  # assigning is the point


def test_rollout_batch_rejects_float_ids() -> None:
    with raises("completion_ids_BT must be int32/int64, got torch.float32"):
        rollout(completion_ids_BT=torch.zeros(B, T))


def test_rollout_batch_rejects_prompt_count_mismatch() -> None:
    with raises("1 prompts for 2 completions"):
        rollout(prompt_ids=[[1, 5]])


def test_rollout_batch_rejects_mask_shape() -> None:
    with raises("completion_mask_BT has shape (2, 4), expected (2, 3) (batch, completion tokens)"):
        rollout(completion_mask_BT=torch.ones(B, T + 1))


def test_rollout_batch_rejects_sampler_logprobs_shape() -> None:
    with raises("sampler_logprobs_BT has shape (3, 3), expected (2, 3)"):
        rollout(sampler_logprobs_BT=torch.zeros(B + 1, T))


def test_rollout_batch_rejects_stop_reason_count() -> None:
    with raises("stop_reason_B needs one entry per row"):
        rollout(stop_reason_B=["stop"])


def test_rollout_batch_rejects_teacher_prompt_count() -> None:
    with raises("3 teacher prompts for 2 completions"):
        rollout(teacher_prompt_ids=[[1], [1], [1]])


# --- TeacherScores ----------------------------------------------------------------------------


def test_teacher_scores_valid_with_topk() -> None:
    teacher_scores = scores()
    assert teacher_scores.top_k == K
    assert teacher_scores.teacher_id == "tiny-teacher"
    assert teacher_scores.metrics == {}


def test_teacher_scores_valid_without_topk_and_int64_ids() -> None:
    assert scores(topk_ids_BTK=None, topk_logprobs_BTK=None).top_k == 0
    int64_ids = torch.zeros(B, T, 1, dtype=torch.int64)
    assert scores(topk_ids_BTK=int64_ids, topk_logprobs_BTK=torch.zeros(B, T, 1)).top_k == 1


def test_teacher_scores_rejects_non_2d_sampled_logprobs() -> None:
    with raises("sampled_logprobs_BT must be [B, T]"):
        scores(sampled_logprobs_BT=torch.zeros(B * T))


def test_teacher_scores_rejects_sampled_logprobs_dtype() -> None:
    with raises("sampled_logprobs_BT must be float32, got torch.float64"):
        scores(sampled_logprobs_BT=torch.zeros(B, T, dtype=torch.float64))


def test_teacher_scores_rejects_mask_shape() -> None:
    with raises("completion_mask_BT has shape (2, 2), expected (2, 3)"):
        scores(completion_mask_BT=torch.ones(B, T - 1))


def test_teacher_scores_rejects_non_positive_temperature() -> None:
    with raises("temperature must be > 0, got 0.0"):
        scores(temperature=0.0)


@pytest.mark.parametrize("missing", ["topk_ids_BTK", "topk_logprobs_BTK"])
def test_teacher_scores_rejects_half_a_topk_pair(missing: str) -> None:
    with raises("topk_ids_BTK and topk_logprobs_BTK come together"):
        scores(**{missing: None})


def test_teacher_scores_rejects_topk_ids_shape() -> None:
    with raises("topk_ids_BTK has shape (2, 4, 4), expected (2, 3) + (K,)"):
        scores(
            topk_ids_BTK=torch.zeros(B, T + 1, K, dtype=torch.int32),
            topk_logprobs_BTK=torch.zeros(B, T + 1, K),
        )


def test_teacher_scores_rejects_2d_topk_ids() -> None:
    with raises("topk_ids_BTK has shape (2, 3), expected (2, 3) + (K,)"):
        scores(
            topk_ids_BTK=torch.zeros(B, T, dtype=torch.int32), topk_logprobs_BTK=torch.zeros(B, T)
        )


def test_teacher_scores_rejects_mismatched_topk_pair_shape() -> None:
    with raises("topk_logprobs_BTK must have the shape of topk_ids_BTK"):
        scores(topk_logprobs_BTK=torch.zeros(B, T, K - 1))


def test_teacher_scores_rejects_float_topk_ids() -> None:
    with raises("topk_ids_BTK must be int32/int64, got torch.float32"):
        scores(topk_ids_BTK=torch.zeros(B, T, K))


def test_teacher_scores_rejects_topk_logprobs_dtype() -> None:
    with raises("topk_logprobs_BTK must be float32, got torch.bfloat16"):
        scores(topk_logprobs_BTK=torch.zeros(B, T, K, dtype=torch.bfloat16))


# --- LossOutput -------------------------------------------------------------------------------


def test_loss_output_holds_values() -> None:
    loss = torch.tensor(1.5, requires_grad=True)
    output = LossOutput(loss=loss, per_token_BT=torch.zeros(B, T), metrics={"kl/reverse": 0.25})
    assert output.loss is loss
    assert output.metrics == {"kl/reverse": 0.25}
    assert LossOutput(loss=loss, per_token_BT=torch.zeros(B, T)).metrics == {}


def test_rollout_rejects_one_dimensional_completions():
    with pytest.raises(ValueError, match=r"completion_ids_BT must be \[B, T\], got shape \(3,\)"):
        RolloutBatch(
            prompt_ids=[[1]],
            completion_ids_BT=torch.tensor([1, 2, 3]),
            completion_mask_BT=torch.ones(3),
        )


def test_rollout_rejects_integer_sampler_logprobs():
    with pytest.raises(ValueError, match="sampler_logprobs_BT must be floating point"):
        RolloutBatch(
            prompt_ids=[[1]],
            completion_ids_BT=torch.tensor([[1, 2]]),
            completion_mask_BT=torch.ones(1, 2),
            sampler_logprobs_BT=torch.zeros(1, 2, dtype=torch.int64),
        )
