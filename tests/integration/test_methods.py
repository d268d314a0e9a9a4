"""`OPDTrainer` wiring of the methods on real tiny models (no vLLM: transformers generation).

The objective functions have their own hand-computed tests (tests/unit/test_compose.py,
test_surrogate.py, test_tip.py, test_weightings.py); these check that the trainer feeds them the
right tensors: the loss sees only TIP's kept tokens, trace rows get LUFFY's shaping, the
divergence term matches the reference maths, the vOPD advantage adds the exact KL, and the
self-teacher and the G-OPD reference are the frozen initial weights.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from opd import OPDConfig, OPDTrainer
from opd.config import ConfigError
from opd.kernels.reference import topk_divergence
from opd.trainer.build import check_method_capabilities
from opd.types import OPDBatchFields

PROMPT_IDS = torch.tensor([[4, 13], [5, 13]])
COMPLETION_IDS = torch.tensor([[6, 7, 2], [8, 2, 0]])
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADVANTAGES_BT = torch.tensor([[0.5, -0.5, 1.0], [-1.0, 0.5, 0.0]])


def make_trainer(tmp_path, tiny_student, tiny_teacher, **fields) -> OPDTrainer:
    args = OPDConfig(
        output_dir=str(tmp_path), teacher_model_name_or_path=str(tiny_teacher),
        report_to="none", per_device_train_batch_size=2, num_generations=2,
        max_completion_length=3, loss_type="bnpo", seed=0, **fields,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    trainer = OPDTrainer(model=str(tiny_student), args=args, train_dataset=dataset)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _inputs(advantages_BT=ADVANTAGES_BT, **opd_fields):
    """A loss micro-batch: TRL's keys, and opd's fields packed in as phase 1 packs them
    (default: every valid token kept, no trace row)."""
    inputs = {
        "prompt_ids": PROMPT_IDS, "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": COMPLETION_IDS, "completion_mask": MASK_BT,
        "advantages": advantages_BT, "num_items_in_batch": MASK_BT.sum(),
    }  # fmt: skip
    defaults = {"keep_mask_BT": MASK_BT.bool(), "offpolicy_B": torch.zeros(2, dtype=torch.bool)}
    OPDBatchFields(**{**defaults, **opd_fields}).pack_into(inputs)
    return inputs


def _completion_logprobs(model):
    """[B, T, V] student log-probs at the completion positions, from the full logits."""
    input_ids = torch.cat([PROMPT_IDS, COMPLETION_IDS], dim=1)
    return torch.log_softmax(model(input_ids=input_ids).logits[:, 1:-1].float(), -1)


def _grads(model):
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_tip_loss_sees_only_kept_tokens_and_the_lm_head_only_their_rows(
    tmp_path, tiny_student, tiny_teacher, monkeypatch
):
    trainer = make_trainer(tmp_path, tiny_student, tiny_teacher)
    keep = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    import opd.trainer.loss

    rows_seen = []
    original = opd.trainer.loss.fused_linear_token_stats

    def recording(hidden, *args, **kwargs):
        rows_seen.append(hidden.shape[0])
        return original(hidden, *args, **kwargs)

    monkeypatch.setattr(opd.trainer.loss, "fused_linear_token_stats", recording)
    loss = trainer._compute_loss(trainer.model, _inputs(keep_mask_BT=keep))
    assert rows_seen == [3]  # 3 kept of 5 valid tokens reach the lm_head
    # bnpo at rho = 1: -(0.5 + 1.0 + 0.5) / 3
    assert loss.item() == pytest.approx(-2.0 / 3, abs=1e-6)
    loss.backward()
    got = _grads(trainer.model)
    logprobs = _completion_logprobs(trainer.model).gather(-1, COMPLETION_IDS[..., None])[..., 0]
    (-(ADVANTAGES_BT * logprobs * keep).sum() / keep.sum()).backward()
    for grad, param in zip(got, trainer.model.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad, atol=1e-6, rtol=1e-4)


def test_an_empty_selection_gives_a_zero_loss_with_a_graph(tmp_path, tiny_student, tiny_teacher):
    trainer = make_trainer(tmp_path, tiny_student, tiny_teacher)
    keep = torch.zeros(2, 3, dtype=torch.bool)  # e.g. Q3 found no overconfident-and-wrong token
    loss = trainer._compute_loss(trainer.model, _inputs(keep_mask_BT=keep))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())


def test_trace_rows_get_luffy_shaping_in_the_loss(tmp_path, tiny_student, tiny_teacher):
    trainer = make_trainer(tmp_path, tiny_student, tiny_teacher, opd_trace_gamma=0.1)
    offpolicy = torch.tensor([True, False])
    loss = trainer._compute_loss(trainer.model, _inputs(offpolicy_B=offpolicy))
    logprobs = _completion_logprobs(trainer.model).gather(-1, COMPLETION_IDS[..., None])[..., 0]
    probs = logprobs.exp()
    # row 0 (trace): -A * p / (p + 0.1); row 1 (on-policy, rho = 1): -A
    per_token = torch.where(offpolicy[:, None], -ADVANTAGES_BT * probs / (probs + 0.1),
                            -ADVANTAGES_BT)  # fmt: skip
    expected = (per_token * MASK_BT).sum() / MASK_BT.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_topk_jsd_divergence_term_matches_the_reference(tmp_path, tiny_student, tiny_teacher):
    trainer = make_trainer(
        tmp_path, tiny_student, tiny_teacher, opd_divergence="jsd", teacher_top_k=4,
        opd_kl_coef=0.0, opd_divergence_coef=2.0, opd_divergence_temperature=1.1,
    )  # fmt: skip
    teacher_lp = torch.log_softmax(
        torch.randn(2, 3, 49, generator=torch.Generator().manual_seed(1)), -1
    )
    topk = teacher_lp.topk(4, -1)
    inputs = _inputs(advantages_BT=torch.zeros(2, 3), teacher_topk_ids_BTK=topk.indices,
                     teacher_topk_logprobs_BTK=topk.values)  # fmt: skip
    loss = trainer._compute_loss(trainer.model, inputs)
    input_ids = torch.cat([PROMPT_IDS, COMPLETION_IDS], dim=1)
    logits = trainer.model(input_ids=input_ids).logits[:, 1:-1].float()
    valid = MASK_BT.bool()
    divergence = topk_divergence(logits[valid], topk.indices[valid], topk.values[valid],
                                 kind="jsd", beta=0.5, temperature=1.1)  # fmt: skip
    assert loss.item() == pytest.approx(2.0 * divergence.mean().item(), abs=1e-5)


def test_vopd_full_advantage_adds_the_exact_kl(tmp_path, tiny_student, tiny_teacher):
    trainer = make_trainer(tmp_path, tiny_student, tiny_teacher, opd_baseline="full")
    prompts = [{"prompt": "1+1=", "answer": "2"}] * 2 + [{"prompt": "2+2=", "answer": "4"}] * 2
    output = trainer._generate_and_score_completions(prompts)
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    num_tokens = output["completion_ids"].shape[1]
    with torch.no_grad():
        student = _completion_distribution(trainer.model, input_ids, attention, num_tokens)
        teacher = _completion_distribution(trainer.teacher.model, input_ids, attention, num_tokens)
    ids = output["completion_ids"][..., None]
    kl = (student.exp() * (student - teacher)).sum(-1)
    expected = (teacher.gather(-1, ids) - student.gather(-1, ids))[..., 0] + kl
    mask = output["completion_mask"].float()
    torch.testing.assert_close(output["advantages"], expected * mask, atol=1e-4, rtol=1e-4)
    assert OPDBatchFields.unpack(output).keep_mask_BT.equal(mask.bool())


def test_self_teacher_and_gopd_reference_are_frozen_initial_weights(
    tmp_path, tiny_student, tiny_teacher
):
    trainer = make_trainer(tmp_path, tiny_student, tiny_teacher, teacher_mode="self",
                           opd_lambda=1.25)  # fmt: skip
    for frozen in (trainer.teacher.model, trainer.opd_reference):
        pairs = list(zip(frozen.parameters(), trainer.model.parameters(), strict=True))
        assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in pairs)
        assert not any(p.requires_grad for p in frozen.parameters())
    input_ids = torch.cat([PROMPT_IDS, COMPLETION_IDS], dim=1)
    with torch.no_grad():
        before = trainer.model(input_ids=input_ids).logits
        for param in trainer.model.parameters():  # an update moves the student only
            param.add_(0.01)
        after = trainer.model(input_ids=input_ids).logits
        # The copies run their own weights: TRL patches the student's `forward` with a closure
        # over the live model, which a plain deepcopy would keep calling.
        torch.testing.assert_close(trainer.teacher.model(input_ids=input_ids).logits, before)
        torch.testing.assert_close(trainer.opd_reference(input_ids=input_ids).logits, before)
    assert not torch.allclose(before, after)
    reference_lp = trainer._reference_logprobs(_inputs())
    student_lp = trainer._logprobs_of(trainer.model, _inputs())
    assert not torch.allclose(reference_lp, student_lp)
    assert trainer.teacher.teacher_id.startswith("self:")


def _completion_distribution(model, input_ids, attention_mask, num_tokens):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.log_softmax(logits[:, -num_tokens - 1 : -1].float(), -1)


class RemoteTeacher:  # a stand-in for a server/vllm client: only its type matters here
    pass


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"opd_baseline": "full"}, "in-process teacher"),
        ({"opd_divergence": "jsd", "opd_divergence_support": "full"}, "in-process teacher"),
        ({"opd_baseline": "topk"}, "teacher_top_k"),
        ({"opd_divergence": "jsd"}, "teacher_top_k"),
        ({"opd_weighting": "scope"}, "reward_funcs"),
        ({"loss_type": "sapo"}, "loss_type"),
        ({"top_entropy_quantile": 0.2}, "tip_rule"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
    ],
)
def test_method_needs_are_checked_before_training(tmp_path, fields, message):
    args = OPDConfig(output_dir=str(tmp_path), teacher_mode="server",
                     teacher_urls=["http://localhost:1"], report_to="none", **fields)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        check_method_capabilities(args, RemoteTeacher(), reward_funcs=None)
