"""Vanilla OPD (METHODS.md section 1): hand-computed advantages and the loss TRL builds on them."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from opd.objectives.vanilla import discounted_future_sum, vanilla_opd_advantage
from opd.types import OPDBatchFields

STUDENT_OLD_BT = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.5, -3.0]])
TEACHER_BT = torch.tensor([[-0.5, -2.5, -0.5], [-1.2, -1.0, -9.0]])
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_advantage_is_teacher_minus_student_logprob():
    # A_t = -(lp_old - lp_t) = lp_t - lp_old; the masked position is 0, not -6.0.
    expected = torch.tensor([[0.5, -0.5, 0.0], [-1.0, 0.5, 0.0]])
    advantages = vanilla_opd_advantage(STUDENT_OLD_BT, TEACHER_BT, MASK_BT)
    torch.testing.assert_close(advantages, expected)


def test_advantage_with_kl_coef_and_outcome_term():
    # c = 2, w = 0.5, A_outcome = [1, -1]: A = 0.5 * A_outcome - 2 * (lp_old - lp_t).
    expected = torch.tensor([[1.5, -0.5, 0.5], [-2.5, 0.5, 0.0]])
    advantages = vanilla_opd_advantage(
        STUDENT_OLD_BT,
        TEACHER_BT,
        MASK_BT,
        kl_coef=2.0,
        outcome_advantage_B=torch.tensor([1.0, -1.0]),
        outcome_weight=0.5,
    )
    torch.testing.assert_close(advantages, expected)


def test_discounted_advantage_sums_future_tokens():
    # gamma = 0.5: row 0 = [0.5 + 0.5 * (-0.5), -0.5 + 0.5 * 0, 0] = [0.25, -0.5, 0];
    # row 1 ignores the masked last token: [-1.0 + 0.5 * 0.5, 0.5, 0] = [-0.75, 0.5, 0].
    expected = torch.tensor([[0.25, -0.5, 0.0], [-0.75, 0.5, 0.0]])
    advantages = vanilla_opd_advantage(STUDENT_OLD_BT, TEACHER_BT, MASK_BT, discount=0.5)
    torch.testing.assert_close(advantages, expected)


def test_discounted_future_sum_matches_loop():
    values = torch.randn(3, 7)
    out = discounted_future_sum(values, 0.9)
    for t in range(7):
        weights = torch.tensor([0.9 ** (u - t) for u in range(t, 7)])
        torch.testing.assert_close(out[:, t], (values[:, t:] * weights).sum(-1))


@pytest.fixture
def cpu_trainer(tiny_student, tiny_teacher, tmp_path):
    from opd import OPDConfig, OPDTrainer

    args = OPDConfig(
        output_dir=str(tmp_path), teacher_model_name_or_path=str(tiny_teacher), report_to="none",
        per_device_train_batch_size=2, num_generations=2, max_completion_length=3,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="]})
    return OPDTrainer(model=str(tiny_student), args=args, train_dataset=dataset)


def test_grpo_loss_on_opd_advantages_matches_hand_computed(cpu_trainer):
    """The [B, T] advantages go through opd's loss (fused lm_head, TRL's dapo normalisation)
    like TRL's GRPO loss: at the first update the ratio is 1, so loss = -sum(A * m) / sum(m)
    and d loss / d lp_s[t] = -A_t m_t / sum(m)."""
    trainer = cpu_trainer
    trainer.current_gradient_accumulation_steps = 1
    advantages_BT = vanilla_opd_advantage(STUDENT_OLD_BT, TEACHER_BT, MASK_BT)
    inputs = {
        "prompt_ids": torch.tensor([[4, 13], [5, 13]]),
        "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": torch.tensor([[6, 7, 2], [8, 2, 0]]),
        "completion_mask": MASK_BT,
        "advantages": advantages_BT,
        "num_items_in_batch": MASK_BT.sum(),
    }
    # what phase 1 adds: every valid token kept, no off-policy trace row
    OPDBatchFields(MASK_BT.bool(), torch.zeros(2, dtype=torch.bool)).pack_into(inputs)
    model = trainer.model.train()
    loss = trainer._compute_loss(model, inputs)
    # -(0.5 - 0.5 + 0 - 1.0 + 0.5) / 5 = 0.1
    torch.testing.assert_close(loss.detach(), torch.tensor(0.1))

    loss.backward()
    grads_trl = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    logprobs_BT = torch.log_softmax(model(input_ids=input_ids).logits[:, 1:-1], -1)
    logprobs_BT = logprobs_BT.gather(-1, inputs["completion_ids"][..., None])[..., 0]
    explicit = -(advantages_BT * logprobs_BT * MASK_BT).sum() / MASK_BT.sum()
    explicit.backward()
    for grad_trl, param in zip(grads_trl, model.parameters(), strict=True):
        torch.testing.assert_close(grad_trl, param.grad, atol=1e-6, rtol=1e-4)
