"""`LocalTeacher`: scores equal an unbatched in-process forward; top-k is the true top-k."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.teacher.local import LocalTeacher
from opd.types import RolloutBatch


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def _batch() -> RolloutBatch:
    completion_ids_BT = torch.tensor([[6, 7, 2], [8, 2, 0], [9, 9, 9]])
    return RolloutBatch(
        prompt_ids=[[4, 13], [5, 6, 7, 13], [4]],
        completion_ids_BT=completion_ids_BT,
        completion_mask_BT=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]),
        teacher_prompt_ids=[[4, 13], [5, 6, 7, 13], [10, 11, 4]],  # row 2: privileged context
    )


def _reference_logprobs_TV(model, context: list[int], completion: list[int], temperature=1.0):
    ids = torch.tensor([context + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_scores_equal_unbatched_forward(teacher_model, batch_size):
    batch = _batch()
    scores = LocalTeacher(teacher_model, temperature=1.3, batch_size=batch_size).score(
        batch, top_k=4
    )
    assert scores.sampled_logprobs_BT.shape == (3, 3) and scores.top_k == 4
    for row in range(3):
        length = int(batch.completion_mask_BT[row].sum())
        completion = batch.completion_ids_BT[row, :length].tolist()
        reference_TV = _reference_logprobs_TV(
            teacher_model, batch.teacher_context_ids[row], completion, temperature=1.3
        )
        expected_T = reference_TV.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(
            scores.sampled_logprobs_BT[row, :length], expected_T, atol=1e-5, rtol=0
        )
        values, indices = reference_TV.topk(4, dim=-1)
        torch.testing.assert_close(
            scores.topk_logprobs_BTK[row, :length], values, atol=1e-5, rtol=0
        )
        assert torch.equal(scores.topk_ids_BTK[row, :length], indices)
    assert scores.sampled_logprobs_BT[1, 2] == 0  # masked position


def test_privileged_context_changes_the_scores(teacher_model):
    batch = _batch()
    teacher = LocalTeacher(teacher_model)
    with_privileged = teacher.score(batch).sampled_logprobs_BT[2]
    plain = RolloutBatch(
        prompt_ids=batch.prompt_ids,
        completion_ids_BT=batch.completion_ids_BT,
        completion_mask_BT=batch.completion_mask_BT,
    )
    assert not torch.allclose(teacher.score(plain).sampled_logprobs_BT[2], with_privileged)
