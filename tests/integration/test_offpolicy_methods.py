"""`OPDTrainer` wiring of the s.10 off-policy family (METHODS.md) on real tiny models.

Each test trains the tiny student for one or two steps in this process (transformers generation,
no vLLM, the tiny in-process teacher) and checks what the trainer did with a method switched on
against a run without it or a hand computation: CHORD's mixture at mu = 0 and mu = 1, VCPO's
ESS-scaled learning rate, the all_fail trace gate, the Thompson ledger across a checkpoint
resume, a ratio form under several updates per generation, and TCOD's depth mask. The pure
functions have their own hand-computed tests (tests/unit/test_imitation.py, test_vcpo.py,
test_trace_gate.py, test_offpolicy_ratios.py, test_curriculum.py).

The runs use SGD with a constant learning rate and no gradient clipping, so an update is exactly
`-lr * grad` and two runs that should train alike must end on the same weights.

Test: `pytest -n 0 tests/integration/test_offpolicy_methods.py`.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from opd import OPDConfig, OPDTrainer
from opd.rollout.trace_gate import PromptLedger, prompt_key
from opd.trainer.offpolicy import IMITATION_TOKENS, LEDGER_FILE
from opd.types import OPDBatchFields

PROMPTS = ["1+1=", "2+2="]  # one token per character: both 4 tokens, no left padding
SOLVED = "1+1="  # the prompt whose rollouts `solved_prompt_reward` marks correct
EXPERT = ["2", "4.0"]  # CHORD's expert traces: 1 + 1 and 3 + 1 tokens with <eos> (6 in all)


def solved_prompt_reward(prompts, completions, **kwargs) -> list[float]:
    """A verifier we control: every rollout of SOLVED is correct, every other one wrong."""
    return [1.0 if prompt == SOLVED else 0.0 for prompt in prompts]


class RecordingTrainer(OPDTrainer):
    """Keeps what each training generation step built (phase 1 values, read after `train`)."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            step = self.step_state
            if not hasattr(self, "recorded"):
                self.recorded = []
            self.recorded.append({
                "prompts": [example["prompt"] for example in inputs],
                "offpolicy_B": list(step.offpolicy_B),
                "completion_ids": output["completion_ids"].clone(),
                "mask_BT": step.mask_BT.clone(),
                "student_old_BT": step.student_old_BT.clone(),
                "teacher_BT": step.scores.sampled_logprobs_BT.clone(),
                "advantages_BT": output["advantages"].clone(),
                "imitation_tokens": output.get(IMITATION_TOKENS),
                "imitation_mask_BL": OPDBatchFields.unpack(output).imitation_mask_BL,
            })  # fmt: skip
        return output


def make_args(output_dir, tiny_teacher, **fields) -> OPDConfig:
    """2 prompts x 2 completions of <= 4 tokens per step, one update per step, plain SGD."""
    defaults = {
        "max_steps": 2, "learning_rate": 0.1, "optim": "sgd", "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0, "save_strategy": "no",
    }  # fmt: skip
    return OPDConfig(
        output_dir=str(output_dir), teacher_model_name_or_path=str(tiny_teacher),
        report_to="none", per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, logging_steps=1, seed=0, **{**defaults, **fields},
    )  # fmt: skip


def make_trainer(output_dir, tiny_student, tiny_teacher, trainer_class=RecordingTrainer,
                 reward_funcs=None, **fields) -> OPDTrainer:  # fmt: skip
    dataset = Dataset.from_dict({
        "prompt": PROMPTS, "answer": ["2", "4"], "trace": ["2", "4"], "expert": EXPERT,
    })  # fmt: skip
    args = make_args(output_dir, tiny_teacher, **fields)
    return trainer_class(
        model=str(tiny_student), args=args, train_dataset=dataset, reward_funcs=reward_funcs
    )


def train(output_dir, tiny_student, tiny_teacher, **kwargs) -> OPDTrainer:
    trainer = make_trainer(output_dir, tiny_student, tiny_teacher, **kwargs)
    trainer.train()
    return trainer


def logged(trainer, name: str) -> list[float]:
    """The per-step values of a logged metric (logging_steps = 1)."""
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


# ----- CHORD -----


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_student, tiny_teacher) -> dict:
    """Vanilla OPD, 2 steps: the per-step losses and the final weights."""
    plain = train(tmp_path_factory.mktemp("plain"), tiny_student, tiny_teacher)
    initial = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    assert not torch.equal(  # it trained: step 2 rolled out of updated weights
        weights(plain)["model.embed_tokens.weight"], initial.model.embed_tokens.weight
    )
    return {"loss": logged(plain, "loss"), "weights": weights(plain)}


def test_chord_at_mu_0_trains_exactly_like_pure_opd(
    tmp_path, tiny_student, tiny_teacher, plain_run
):
    """mu = 0 leaves the OPD loss untouched (no expert forward, no random draw): bit-equal."""
    chord = train(tmp_path, tiny_student, tiny_teacher, opd_imitation_column="expert",
                  opd_imitation_peak=0.0, opd_imitation_valley=0.0)  # fmt: skip
    assert logged(chord, "opd/imitation_coef") == [0.0, 0.0]  # the column was wired in
    assert logged(chord, "loss") == plain_run["loss"]
    assert_same_weights(weights(chord), plain_run["weights"])


def test_chord_at_mu_1_is_the_mean_nll_of_the_expert_tokens(tmp_path, tiny_student, tiny_teacher):
    """mu = 1, token weight 1: the step's loss is the NLL of all expert tokens (one trace per
    prompt, 6 tokens) divided by 6 (a token mean, not a mean of per-trace means), and its
    update is SGD's on that NLL alone."""
    lr = 0.1
    trainer = train(tmp_path, tiny_student, tiny_teacher, max_steps=1, learning_rate=lr,
                    opd_imitation_column="expert", opd_imitation_peak=1.0,
                    opd_imitation_valley=1.0, opd_imitation_token_weight="none")  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    total, count = torch.zeros(()), 0
    for prompt, expert in zip(PROMPTS, EXPERT, strict=True):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        expert_ids = [*tokenizer.encode(expert, add_special_tokens=False), tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + expert_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
        total = total - logprobs[positions, ids[0, positions + 1]].sum()
        count += len(expert_ids)
    assert count == 6
    [step] = trainer.recorded  # the first row of each group carries its prompt's trace
    taken_B = step["imitation_mask_BL"].sum(1)
    assert taken_B.tolist() == [len(EXPERT[PROMPTS.index(p)]) + 1 if row % 2 == 0 else 0
                                for row, p in enumerate(step["prompts"])]  # fmt: skip
    assert float(step["imitation_tokens"]) == count
    nll = total / count
    assert logged(trainer, "loss")[0] == pytest.approx(nll.item(), abs=1e-5)
    assert logged(trainer, "opd/imitation_nll")[0] == pytest.approx(nll.item(), abs=1e-5)
    nll.backward()
    after = weights(trainer)
    for name, param in model.named_parameters():  # theta_1 = theta_0 - lr * grad NLL
        expected = param.detach() - lr * param.grad
        torch.testing.assert_close(after[name], expected, atol=1e-6, rtol=1e-5, msg=name)


# ----- VCPO -----


class KnownWeightsTrainer(RecordingTrainer):
    """Importance log weights set by the test (the sampler is not vLLM here): log 4 on every
    valid token of row 0, 0 elsewhere."""

    def importance_log_weights_BT(self, step, output):
        log_w_B = torch.zeros(step.mask_BT.shape[0])
        log_w_B[0] = math.log(4.0)
        self.known_log_weights_BT = log_w_B[:, None] * step.mask_BT
        return self.known_log_weights_BT


class LearningRateProbe(TrainerCallback):
    """The optimizer's lr right after `optimizer.step()` (before the scheduler moves it)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.seen: list[tuple[list[float], list[float]]] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        groups = [group["lr"] for group in self.trainer.optimizer.param_groups]
        self.seen.append((groups, list(self.trainer.lr_scheduler.get_last_lr())))


def test_vcpo_scales_the_learning_rate_not_the_loss(tmp_path, tiny_student, tiny_teacher):
    """With SGD an update is -lr * grad: the ESS-scaled run must move the weights exactly as an
    unscaled run at lr * sqrt(f), and log that run's loss (a scaled loss would not)."""
    lr = 0.1
    scaled = make_trainer(tmp_path / "scaled", tiny_student, tiny_teacher, KnownWeightsTrainer,
                          max_steps=1, learning_rate=lr, opd_lr_ess_scaling=True)  # fmt: skip
    probe = LearningRateProbe(scaled)
    scaled.add_callback(probe)
    before = weights(scaled)
    scaled.train()
    # w = 4 on the n0 valid tokens of row 0, 1 on the other n1:
    # f = (4 n0 + n1)^2 / ((n0 + n1) (16 n0 + n1)), lr scale sqrt(f) (VCPO's sqrt rule)
    mask_BT = scaled.recorded[0]["mask_BT"]
    n0, n1 = float(mask_BT[0].sum()), float(mask_BT[1:].sum())
    fraction = (4 * n0 + n1) ** 2 / ((n0 + n1) * (16 * n0 + n1))
    assert fraction < 0.9  # far enough from 1 that an unscaled update would differ
    assert logged(scaled, "opd/ess_fraction")[0] == pytest.approx(fraction, rel=1e-6)
    assert logged(scaled, "opd/lr_scale")[0] == pytest.approx(math.sqrt(fraction), rel=1e-6)
    # after the step the optimizer holds the scheduler's (unscaled) lr again, in every group
    [(groups, scheduled)] = probe.seen
    assert groups == scheduled == [lr] * len(groups)
    reference = train(tmp_path / "reference", tiny_student, tiny_teacher, max_steps=1,
                      learning_rate=lr * math.sqrt(fraction))  # fmt: skip
    assert logged(scaled, "loss") == pytest.approx(logged(reference, "loss"), abs=1e-7)
    after_scaled, after_reference = weights(scaled), weights(reference)
    for name, theta_0 in before.items():
        update, expected = after_scaled[name] - theta_0, after_reference[name] - theta_0
        torch.testing.assert_close(update, expected, atol=1e-7, rtol=1e-5, msg=name)
    assert any((after_scaled[n] - before[n]).abs().max() > 1e-4 for n in before)


# ----- gated LUFFY insertion -----


def test_all_fail_gate_inserts_traces_only_into_failed_groups(tmp_path, tiny_student, tiny_teacher):
    """SOLVED's group is all correct, the other all wrong: only the latter gets its trace."""
    trainer = train(tmp_path, tiny_student, tiny_teacher, reward_funcs=[solved_prompt_reward],
                    opd_trace_column="trace", opd_trace_gate="all_fail")  # fmt: skip
    tokenizer = trainer.processing_class
    for step in trainer.recorded:
        traced = [row for row, flag in enumerate(step["offpolicy_B"]) if flag]
        # the last row of the failed prompt's group, and nothing in SOLVED's group
        failed_rows = [row for row, prompt in enumerate(step["prompts"]) if prompt != SOLVED]
        assert traced == [failed_rows[-1]]
        ids = step["completion_ids"][traced[0]][step["mask_BT"][traced[0]].bool()]
        assert tokenizer.decode(ids.tolist()) == "4<eos>"
    assert logged(trainer, "opd/trace_insert_fraction") == [0.5, 0.5]  # 1 group of 2
    assert logged(trainer, "opd/offpolicy_fraction") == [0.25, 0.25]  # 1 row of 4


# ----- per-prompt state across a resume -----


def test_thompson_ledger_and_weights_survive_a_checkpoint_resume(
    tmp_path, tiny_student, tiny_teacher
):
    """Step 2's Thompson draws read the ledger of step 1: a resume that lost it would gate (and
    count) differently."""
    fields = {"reward_funcs": [solved_prompt_reward], "opd_trace_column": "trace",
              "opd_trace_gate": "thompson", "opd_trace_cache": True,
              "save_strategy": "steps", "save_steps": 1}  # fmt: skip
    whole = train(tmp_path / "whole", tiny_student, tiny_teacher, **fields)
    checkpoint = tmp_path / "whole" / "checkpoint-1"
    assert (checkpoint / LEDGER_FILE).is_file()
    # after step 1: SOLVED's 2 rollouts correct, the other prompt's 2 wrong
    ledger_1 = PromptLedger.from_state_dict(json.loads((checkpoint / LEDGER_FILE).read_text()))
    solved, failed = prompt_key(SOLVED), prompt_key(PROMPTS[1])
    assert ledger_1.successes == {solved: 2, failed: 0}
    assert ledger_1.failures == {solved: 0, failed: 2}
    assert list(ledger_1.cached_traces) == [solved]  # BEPA: only a success is cached
    assert whole.trace_ledger.successes == {solved: 4, failed: 0}

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-1")
    resumed = make_trainer(tmp_path / "resumed", tiny_student, tiny_teacher, **fields)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-1"))
    assert resumed.trace_ledger.state_dict() == whole.trace_ledger.state_dict()
    # the resumed history holds step 1 from the checkpoint, then its own step 2
    assert logged(resumed, "loss") == pytest.approx(logged(whole, "loss"), abs=1e-6)
    assert_same_weights(weights(resumed), weights(whole), atol=1e-6)


# ----- a ratio form in the loop -----


def test_topr_second_update_is_off_policy(tmp_path, tiny_student, tiny_teacher):
    trainer = train(tmp_path, tiny_student, tiny_teacher, opd_ratio="topr", num_iterations=2,
                    learning_rate=0.5)  # fmt: skip
    first, second = logged(trainer, "opd/is_ess_fraction")
    # step 1: the weights that computed lp_old (ratio 1 up to two forwards' round-off);
    # step 2: the same rollouts after one update, lp_s != lp_old
    assert first == pytest.approx(1.0, abs=1e-6)
    assert second < 1.0 - 1e-4
    assert len(trainer.recorded) == 1  # one generation for both updates


def test_topr_at_ratio_1_trains_like_plain(tmp_path, tiny_student, tiny_teacher, plain_run):
    """num_iterations 1, transformers generation: lp_old = lp_s, TOPR's gradient is plain's
    (its loss value, -A lp_s, is not)."""
    topr = train(tmp_path, tiny_student, tiny_teacher, opd_ratio="topr")
    assert_same_weights(weights(topr), plain_run["weights"], atol=1e-6)
    assert logged(topr, "opd/is_ess_fraction") == [1.0, 1.0]


# ----- TCOD -----


def test_tcod_puts_the_opd_advantage_on_the_first_depth_tokens(
    tmp_path, tiny_student, tiny_teacher
):
    """D(0) = 1, D(1) = 1 + floor((3 - 1) * 1 / 2) = 2: A_t = (lp_teacher - lp_old) on the first
    D valid tokens of each completion, 0 after."""
    trainer = train(tmp_path, tiny_student, tiny_teacher, tcod_unit="tokens", tcod_start=1,
                    tcod_end=3, tcod_ramp_steps=2)  # fmt: skip
    assert logged(trainer, "opd/tcod_depth") == [1.0, 2.0]
    for depth, step, mean in zip(
        (1, 2), trainer.recorded, logged(trainer, "opd/advantage_mean"), strict=True
    ):
        mask_BT = step["mask_BT"]
        first_BT = (torch.arange(mask_BT.shape[1]) < depth).float()[None] * mask_BT
        expected_BT = (step["teacher_BT"] - step["student_old_BT"]) * first_BT
        torch.testing.assert_close(step["advantages_BT"], expected_BT, atol=1e-6, rtol=0)
        assert torch.equal(expected_BT != 0, first_BT.bool())  # the kept tokens carry a signal
        assert mean == pytest.approx(float(expected_BT.sum() / mask_BT.sum()), abs=1e-6)
