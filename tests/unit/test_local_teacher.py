"""`LocalTeacher`: scores equal an unbatched in-process forward; top-k is the true top-k."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.teacher.local import LocalTeacher
from opd.teacher.protocol import FullDistributionTeacher
from opd.teacher.routed import RoutedTeacher
from opd.teacher.wire import MIN_TEMPERATURE, SequenceScores, make_request
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


def _ragged_sequences(num_sequences: int, seed: int = 0) -> tuple[list, list]:
    """Contexts of 1-40 and completions of 1-60 tokens: mini-batches that pad a lot."""
    rng = random.Random(seed)
    contexts = [
        [rng.randrange(49) for _ in range(rng.randint(1, 40))] for _ in range(num_sequences)
    ]
    completions = [
        [rng.randrange(49) for _ in range(rng.randint(1, 60))] for _ in range(num_sequences)
    ]
    return contexts, completions


def test_batch_neighbours_change_scores_by_rounding_only(teacher_model):
    """A sequence scored alone and inside a padded mini-batch: padding changes the matmul shapes,
    so the scores differ by float rounding, not bit for bit (measured at most 1.2e-6 at
    temperature 1; the tolerance leaves 8x). With batch_size=1 they are bit-identical."""
    contexts, completions = _ragged_sequences(6)
    alone = SequenceScores.concat(
        [
            LocalTeacher(teacher_model).score_sequences(make_request([c], [d], top_k=4))
            for c, d in zip(contexts, completions, strict=True)
        ]
    )
    request = make_request(contexts, completions, top_k=4)
    together = LocalTeacher(teacher_model, batch_size=6).score_sequences(request)
    torch.testing.assert_close(
        together.sampled_logprobs_M, alone.sampled_logprobs_M, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(together.topk_logprobs_MK, alone.topk_logprobs_MK, atol=1e-5, rtol=0)
    one_by_one = LocalTeacher(teacher_model, batch_size=1).score_sequences(request)
    assert torch.equal(one_by_one.sampled_logprobs_M, alone.sampled_logprobs_M)
    assert torch.equal(one_by_one.topk_logprobs_MK, alone.topk_logprobs_MK)
    assert torch.equal(one_by_one.topk_ids_MK, alone.topk_ids_MK)


def test_scores_are_finite_at_the_temperature_floor(teacher_model):
    """`MIN_TEMPERATURE` (the server's floor) with logits 500x the tiny model's, larger than a
    real model's: every score is finite. At 1e-45 (which passed the old `> 0` check) every one
    is NaN: logits / temperature overflows float32."""
    loud_model = copy.deepcopy(teacher_model)
    with torch.no_grad():
        loud_model.model.norm.weight.mul_(500)  # the logits scale with the final norm
    contexts, completions = _ragged_sequences(4, seed=1)
    with torch.no_grad():
        logits = loud_model(input_ids=torch.tensor([contexts[0] + completions[0]])).logits
    assert logits.abs().max() > 300
    teacher = LocalTeacher(loud_model, batch_size=2)
    at_floor = teacher.score_sequences(
        make_request(contexts, completions, top_k=64, temperature=MIN_TEMPERATURE)
    )
    assert torch.isfinite(at_floor.sampled_logprobs_M).all()
    assert torch.isfinite(at_floor.topk_logprobs_MK[:, :49]).all()  # 49 tokens; the rest: -inf
    assert torch.isneginf(at_floor.topk_logprobs_MK[:, 49:]).all()
    tiny = teacher.score_sequences(make_request(contexts, completions, temperature=1e-45))
    assert torch.isnan(tiny.sampled_logprobs_M).all()


def test_no_logits_over_the_prompt(teacher_model):
    """A long prompt costs no `[T, V]` logits: the head runs from the shortest context's last
    token on (measured: 4 sequences of 4096 + 256 tokens, 32k vocabulary, +2291 -> +291 MiB)."""
    logits_lengths = []

    def recording_forward(**inputs):
        output = type(teacher_model).forward(teacher_model, **inputs)
        logits_lengths.append(output.logits.shape[1])
        return output

    contexts = [[4] * 60, [5] * 50]
    completions = [[6, 7, 2], [8, 2, 9, 9, 9]]
    request = make_request(contexts, completions, top_k=3)
    expected = LocalTeacher(teacher_model, batch_size=1).score_sequences(request)
    teacher = LocalTeacher(copy.copy(teacher_model), batch_size=2)
    teacher.model.forward = recording_forward
    scores = teacher.score_sequences(request)
    # One forward of width 63 (60 + 3); logits from position 49 (the shorter context's last
    # token) to 61 (the last position that predicts a token): 13, not 63.
    assert logits_lengths == [13]
    torch.testing.assert_close(scores.sampled_logprobs_M, expected.sampled_logprobs_M)
    assert torch.equal(scores.topk_ids_MK, expected.topk_ids_MK)


def test_only_a_single_in_process_teacher_gives_the_full_distribution(teacher_model):
    """The trainer runs hidden states only for a `FullDistributionTeacher`: a local teacher is
    one; a routed teacher (even over local ones) scores rows by route and is not."""
    teacher = LocalTeacher(teacher_model)
    assert isinstance(teacher, FullDistributionTeacher)
    assert not isinstance(RoutedTeacher({"math": teacher}), FullDistributionTeacher)
    batch = _batch()
    hidden_BTH = teacher.completion_hidden_states(batch)
    # hidden @ output_weight.T is the teacher's own logits: the full distribution, unchanged.
    logits_TV = hidden_BTH[2] @ teacher.output_weight.T
    expected_TV = _reference_logprobs_TV(teacher_model, [10, 11, 4], [9, 9, 9])
    torch.testing.assert_close(torch.log_softmax(logits_TV, -1), expected_TV)
