"""`OPDTrainer` with a teacher of another tokenizer (`teacher_cross_tokenizer`).

- With two identical tokenizers, cross-tokenizer mode trains exactly like the same-tokenizer path:
  the same teacher scores, advantages, losses, divergence and weights, bit for bit (the teacher
  scores one sequence per forward, `teacher_batch_size: 1`, so padding cannot change rounding).
- The demo's character-level student against a BPE teacher: every aligned span's advantages sum
  to the teacher's logprob of its teacher tokens (an independent forward of the teacher on its own
  rendering of the prompt and of the completion text) minus the student's lp_old of the span;
  the GOLD/ULD divergence runs at span starts only.

Test: `pytest -n 0 -q tests/integration/test_cross_tokenizer.py`.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd import OPDConfig, OPDTrainer
from opd.demo.bpe import save_tiny_bpe
from opd.teacher.alignment import HFTeacherTokens, align_completion
from opd.teacher.cross_tokenizer import BOUNDARY_TOP_K

PROMPTS = ["12+3=", "45+6=", "7+8=", "99+9="]


class RecordingTrainer(OPDTrainer):
    """Keeps each training step's phase-1 values and the loss micro-batch's fields."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        step = self.step_state
        self.__dict__.setdefault("recorded", []).append({
            "prompts": [example["prompt"] for example in inputs],
            "completion_ids": output["completion_ids"].clone(),
            "mask_BT": step.mask_BT.clone(),
            "student_old_BT": step.student_old_BT.clone(),
            "teacher_BT": step.scores.sampled_logprobs_BT.clone(),
            "advantages_BT": output["advantages"].clone(),
            "divergence_mask_BT": output.get("opd_divergence_mask"),
        })  # fmt: skip
        return output


def train(output_dir, student, teacher, **fields) -> RecordingTrainer:
    defaults = {
        "max_steps": 2, "learning_rate": 0.1, "optim": "sgd", "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0, "save_strategy": "no", "teacher_mode": "local",
        "teacher_model_name_or_path": str(teacher), "teacher_batch_size": 1,
        "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 5,
    }  # fmt: skip
    args = OPDConfig(output_dir=str(output_dir), report_to="none", logging_steps=1, seed=0,
                     **{**defaults, **fields})  # fmt: skip
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    trainer = RecordingTrainer(model=str(student), args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def logged(trainer, name: str) -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


DIVERGENCE = {"opd_divergence": "jsd", "opd_divergence_coef": 1.0, "teacher_top_k": 4}


@pytest.mark.parametrize("cross_vocab", ["gold", "hybrid"])
def test_identical_tokenizers_train_exactly_like_the_same_tokenizer_path(
    tmp_path, tiny_student, tiny_teacher, cross_vocab
):
    same = train(tmp_path / "same", tiny_student, tiny_teacher, **DIVERGENCE)
    cross = train(tmp_path / "cross", tiny_student, tiny_teacher, **DIVERGENCE,
                  teacher_cross_tokenizer=True, opd_cross_vocab=cross_vocab)  # fmt: skip
    for a, b in zip(same.recorded, cross.recorded, strict=True):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        assert torch.equal(a["teacher_BT"], b["teacher_BT"])
        assert torch.equal(a["advantages_BT"], b["advantages_BT"])
        assert torch.equal(b["divergence_mask_BT"], b["mask_BT"])  # every token starts a span
    assert logged(cross, "loss") == logged(same, "loss")
    assert logged(cross, "opd/divergence") == logged(same, "opd/divergence")
    assert logged(cross, "teacher/cross_spans_per_token") == [1.0, 1.0]
    if cross_vocab == "hybrid":  # one vocabulary: every id matched, nothing left for ULD
        assert logged(cross, "opd/uld_distance") == [0.0, 0.0]
    same_weights, cross_weights = weights(same), weights(cross)
    for name, value in same_weights.items():
        assert torch.equal(value, cross_weights[name]), name


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory):
    return save_tiny_bpe(tmp_path_factory.mktemp("bpe_teacher"), seed=1)


def _span_totals(alignment, teacher_T, logprobs_TV, teacher_tokenizer) -> list[float]:
    """Each span's teacher logprob after the boundary shifts (`BoundaryCredit`), recomputed
    from an independent forward: the character-level student never has a longer token, so every
    span but the last hands `log p(t) - log sum_{v in top-16, v starts with t} p(v)` of its last
    teacher token t to the next span."""
    strings = teacher_tokenizer.convert_ids_to_tokens(list(range(len(teacher_tokenizer))))
    specials = set(teacher_tokenizer.all_special_ids)
    totals, carried = [], 0.0
    for index, span in enumerate(alignment.spans):
        total = float(teacher_T[span.teacher_lo : span.teacher_hi].sum()) + carried
        carried = 0.0
        last = span.teacher_hi - 1
        token = alignment.teacher_ids[last]
        top_V = logprobs_TV[last].topk(BOUNDARY_TOP_K)
        pairs = zip(top_V.indices.tolist(), top_V.values, strict=True)
        longer = [value for candidate, value in pairs
                  if candidate != token and candidate not in specials
                  and strings[candidate].startswith(strings[token])]  # fmt: skip
        if index < len(alignment.spans) - 1 and longer and token not in specials:
            carried = float(teacher_T[last] - torch.stack([teacher_T[last], *longer]).logsumexp(0))
            total -= carried
        totals.append(total)
    return totals


@pytest.mark.parametrize("rule", ["all", "last", "spread"])
def test_each_span_gets_the_teachers_span_logprob_minus_the_students(
    tmp_path, tiny_student, bpe_teacher, rule
):
    trainer = train(tmp_path, tiny_student, bpe_teacher, max_steps=1, temperature=1.0,
                    teacher_cross_tokenizer=True, teacher_span_rule=rule,
                    **DIVERGENCE, opd_cross_vocab="hybrid")  # fmt: skip
    [step] = trainer.recorded
    student_tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(bpe_teacher)
    teacher = AutoModelForCausalLM.from_pretrained(bpe_teacher, dtype=torch.float32).eval()
    tokens = HFTeacherTokens(teacher_tokenizer)
    multi_token_spans = 0
    for row, prompt in enumerate(step["prompts"]):
        length = int(step["mask_BT"][row].sum())
        student_ids = step["completion_ids"][row, :length].tolist()
        alignment = align_completion(student_ids, student_tokenizer, tokens)
        prompt_ids = teacher_tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prompt_ids + alignment.teacher_ids])
        with torch.no_grad():
            logprobs = teacher(input_ids=ids).logits[0, :-1].log_softmax(-1)
        logprobs_TV = logprobs[len(prompt_ids) - 1 :]
        teacher_T = logprobs_TV.gather(-1, ids[0, len(prompt_ids) :, None])[:, 0]
        totals = _span_totals(alignment, teacher_T, logprobs_TV, teacher_tokenizer)
        starts = torch.zeros(step["mask_BT"].shape[1], dtype=torch.bool)
        for span, total in zip(alignment.spans, totals, strict=True):
            student = slice(span.student_lo, span.student_hi)
            expected = total - float(step["student_old_BT"][row, student].sum())
            got = step["advantages_BT"][row, student]
            split = span.teacher_hi - span.teacher_lo == 1 and len(got) > 1
            if rule == "all" and not split:  # the span's reward on each of its tokens
                assert got.tolist() == pytest.approx([expected] * len(got), abs=1e-4)
            else:  # shared out (or split by prefix): the tokens sum to the span's reward
                assert float(got.sum()) == pytest.approx(expected, abs=1e-4)
            if rule == "last" and not split:
                assert got[:-1].tolist() == [0.0] * (len(got) - 1)
            if rule == "spread" and not split:
                assert torch.allclose(got, got.mean().expand_as(got), atol=1e-6)
            multi_token_spans += span.student_hi - span.student_lo > 1
            starts[span.student_lo] = True
        assert torch.equal(step["divergence_mask_BT"][row].bool(), starts)
    assert logged(trainer, "opd/uld_distance")[0] > 0  # the BPE vocabulary's merges are unmatched
    # GOLD's map: equal strings, plus the EOS pair (another string at another id here)
    map_V = trainer.cross_vocab_map_V
    assert map_V[teacher_tokenizer.eos_token_id] == student_tokenizer.eos_token_id
    assert map_V[
        teacher_tokenizer.convert_tokens_to_ids("7")
    ] == student_tokenizer.convert_tokens_to_ids("7")
    assert map_V[teacher_tokenizer.convert_tokens_to_ids("42")] == -1
    assert logged(trainer, "opd/divergence")[0] > 0
    spans_per_token = logged(trainer, "teacher/cross_spans_per_token")[0]
    assert (spans_per_token < 1.0) == (multi_token_spans > 0)
