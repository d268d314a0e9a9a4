"""`OPDTrainer` wiring of METHODS.md s.11 (MOPD, prefix-guided rollouts, TRACE) on tiny models.

Each test trains the tiny student for one to three steps in this process (transformers
generation, no vLLM) and checks what the trainer built against OPSD's run or a hand computation:
MOPD without a peer success trains exactly like OPSD; the teacher prompt of a 4-member group with
known rewards is exactly the expected text; rows without a context get no distillation term;
POPE's gate guides only groups that failed, and its ledger is checkpointed; completion-placed
prefix tokens get NLL's or LUFFY's gradient, never the on-policy ratio's; TRACE routes each token
to one term and, with its KL channels annealed away, is plain GRPO. The pure functions have their
own tests (tests/unit/test_peer_context.py, test_prefix.py, test_spans.py, test_compose.py);
generation continuing from the prefix under vLLM: tests/integration/test_prefix_vllm.py.

Plain SGD, a constant learning rate and no clipping: two runs that train alike end bit-equal.

Test: `pytest -n 0 tests/integration/test_guidance_methods.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd import OPDConfig, OPDTrainer
from opd.rollout.trace_gate import PromptLedger, prompt_key
from opd.trainer.guidance import PREFIX_LEDGER_FILE
from opd.types import OPDBatchFields, TokenSource

PROMPTS = ["1+1=", "2+2="]  # one token per character: both 4 tokens, no left padding
SOLUTIONS = ["1+1=2", "2+2=4"]  # the reference solutions (prefix source, OPSD's context)
SOLVED = "1+1="
TEMPLATE = "{context}={prompt}"


def never_correct(completions, **kwargs) -> list[float]:
    return [0.0] * len(completions)


def solved_prompt_reward(prompts, completions, **kwargs) -> list[float]:
    """Every rollout of SOLVED is correct, every other one wrong."""
    return [1.0 if prompt == SOLVED else 0.0 for prompt in prompts]


def alternate_reward(completions, **kwargs) -> list[float]:
    """Rows 0 and 2 of each group of 4 correct (one process: the call holds the whole batch)."""
    return [1.0 if i % 4 in (0, 2) else 0.0 for i in range(len(completions))]


class RecordingTrainer(OPDTrainer):
    """Keeps each training generation step's phase-1 values and the last loss micro-batch."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            step = self.step_state
            self.__dict__.setdefault("recorded", []).append({
                "prompts": [example["prompt"] for example in inputs],
                "prompt_ids": [ids[m.bool()].tolist()
                               for ids, m in zip(output["prompt_ids"], output["prompt_mask"],
                                                 strict=True)],
                "completion_ids": output["completion_ids"].clone(),
                "mask_BT": step.mask_BT.clone(),
                "teacher_prompt_ids": step.batch.teacher_prompt_ids,
                "prefix_ids_B": step.prefix_ids_B,
                "student_old_BT": step.student_old_BT.clone(),
                "teacher_BT": step.scores.sampled_logprobs_BT.clone(),
                "advantages_BT": output["advantages"].clone(),
                "outcome_B": step.rewards_BF[:, 0].clone(),
                "term_masks": step.term_masks,
            })  # fmt: skip
        return output

    def _compute_loss(self, model, inputs):
        self.last_inputs = dict(inputs)
        return super()._compute_loss(model, inputs)


def train(output_dir, tiny_student, **kwargs) -> RecordingTrainer:
    trainer = build(output_dir, tiny_student, **kwargs)
    trainer.train()
    return trainer


def build(output_dir, tiny_student, *, reward_funcs=None, **fields) -> RecordingTrainer:
    defaults = {
        "max_steps": 2, "learning_rate": 0.1, "optim": "sgd", "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0, "save_strategy": "no", "teacher_mode": "self",
        "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4,
    }  # fmt: skip
    args = OPDConfig(output_dir=str(output_dir), report_to="none", logging_steps=1, seed=0,
                     **{**defaults, **fields})  # fmt: skip
    dataset = Dataset.from_dict({"prompt": PROMPTS, "solution": SOLUTIONS, "answer": ["2", "4"]})
    return RecordingTrainer(model=str(tiny_student), args=args, train_dataset=dataset,
                            reward_funcs=reward_funcs)  # fmt: skip


def logged(trainer, name: str) -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----- MOPD -----

OPSD = {"teacher_context_column": "solution", "teacher_context_template": TEMPLATE,
        "opd_divergence": "jsd", "opd_divergence_coef": 1.0,
        "opd_divergence_support": "full"}  # fmt: skip


def test_mopd_without_a_peer_success_trains_exactly_like_opsd(tmp_path, tiny_student):
    """No rollout is ever correct: every row's context is its reference solution, as OPSD's,
    so the teacher prompts, the advantages (sampled-token term) and the divergence term are
    OPSD's, bit for bit."""
    opsd = train(tmp_path / "opsd", tiny_student, reward_funcs=[never_correct], **OPSD)
    mopd = train(tmp_path / "mopd", tiny_student, reward_funcs=[never_correct],
                 mopd_peers="contrastive", **OPSD)  # fmt: skip
    assert logged(mopd, "opd/mopd_context_fraction") == [1.0, 1.0]  # the reference fallback
    assert logged(mopd, "opd/mopd_groups_with_success") == [0.0, 0.0]
    for a, b in zip(opsd.recorded, mopd.recorded, strict=True):
        assert a["teacher_prompt_ids"] == b["teacher_prompt_ids"]
        assert torch.equal(a["advantages_BT"], b["advantages_BT"])
    assert logged(mopd, "loss") == logged(opsd, "loss")
    assert logged(mopd, "opd/divergence") == logged(opsd, "opd/divergence")
    assert_same_weights(weights(mopd), weights(opsd))


def test_mopd_teacher_prompt_of_a_group_with_known_rewards(tmp_path, tiny_student):
    """One group of 4 with rewards [1, 0, 1, 0]: each row's teacher prompt is the template
    filled with exactly its peers' completions under their labels (ids of the expected text)."""
    trainer = train(tmp_path, tiny_student, reward_funcs=[alternate_reward], max_steps=1,
                    num_generations=4, mopd_peers="contrastive", mopd_max_successes=2,
                    mopd_max_failures=1, mopd_success_label="ok", mopd_failure_label="no",
                    teacher_context_template=TEMPLATE)  # fmt: skip
    [step] = trainer.recorded
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    texts = [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip()
        for ids, mask in zip(step["completion_ids"], step["mask_BT"], strict=True)
    ]
    ok, no = (lambda t: f"ok\n{t}"), (lambda t: f"no\n{t}")
    expected_contexts = [
        f"{ok(texts[2])}\n\n{no(texts[1])}",
        f"{ok(texts[0])}\n\n{ok(texts[2])}\n\n{no(texts[3])}",
        f"{ok(texts[0])}\n\n{no(texts[1])}",
        f"{ok(texts[0])}\n\n{ok(texts[2])}\n\n{no(texts[1])}",
    ]
    prompt = step["prompts"][0]
    expected_ids = [
        tokenizer(TEMPLATE.format(context=context, prompt=prompt))["input_ids"]
        for context in expected_contexts
    ]
    assert step["teacher_prompt_ids"] == expected_ids
    assert logged(trainer, "opd/mopd_groups_with_success") == [1.0]
    lengths = [len(ids) for ids in expected_ids]
    assert logged(trainer, "opd/mopd_context_tokens") == [pytest.approx(sum(lengths) / 4)]


def test_mopd_rows_without_any_context_get_no_distillation_term(tmp_path, tiny_student):
    """No success and no reference column: no row has a context, so the distillation term and
    the divergence term are masked everywhere and SGD leaves the weights where they were."""
    trainer = train(tmp_path, tiny_student, reward_funcs=[never_correct], max_steps=1,
                    mopd_peers="successes", teacher_context_template=TEMPLATE,
                    opd_divergence="jsd", opd_divergence_support="full")  # fmt: skip
    [step] = trainer.recorded
    assert logged(trainer, "opd/mopd_context_fraction") == [0.0]
    assert not step["advantages_BT"].any()
    assert not step["term_masks"].forward_kl_BT.any()
    initial = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    assert_same_weights(weights(trainer), dict(initial.named_parameters()))


# ----- prefix-guided rollouts -----

POPE = {"opd_prefix_column": "solution", "opd_prefix_gate": "failed", "opd_prefix_guided": 1,
        "opd_prefix_fraction_start": 0.4, "opd_prefix_fraction_end": 0.4}  # fmt: skip


def test_pope_gate_guides_only_groups_that_failed_and_checkpoints_its_ledger(
    tmp_path, tiny_student
):
    """Step 1: the ledger is empty, nothing is guided. From step 2 on, the first member of the
    never-solved prompt's group continues from 40% of its solution (2 of 5 tokens, in the
    prompt), the solved prompt's group stays unguided. The ledger counts unguided rows only."""
    trainer = train(tmp_path, tiny_student, reward_funcs=[solved_prompt_reward], max_steps=3,
                    save_strategy="steps", save_steps=1, **POPE)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    first, *later = trainer.recorded
    assert first["prefix_ids_B"] == [None] * 4
    for step in later:
        for row, prompt in enumerate(step["prompts"]):
            prefix = step["prefix_ids_B"][row]
            plain = tokenizer(prompt)["input_ids"]
            if prompt != SOLVED and row % 2 == 0:  # the first member of the failed group
                assert prefix == tokenizer.encode("2+", add_special_tokens=False)
                assert step["prompt_ids"][row] == plain + prefix  # POPE: in the prompt
                assert step["teacher_prompt_ids"] is None  # the teacher reads the same prompt
            else:
                assert prefix is None and step["prompt_ids"][row] == plain
    assert logged(trainer, "opd/prefix_guided_fraction") == [0.0, 0.25, 0.25]
    solved, failed = prompt_key(SOLVED), prompt_key(PROMPTS[1])
    ledger = PromptLedger.from_state_dict(
        json.loads((tmp_path / "checkpoint-2" / PREFIX_LEDGER_FILE).read_text())
    )
    assert ledger.successes == {solved: 4, failed: 0}
    assert ledger.failures == {solved: 0, failed: 3}  # step 2: 1 guided row not counted
    assert trainer.prefix_ledger.failures[failed] == 4


def _policy_loss_gradient(trainer, advantage_scale: float = 1.0):
    """d(loss_N)/d(logprob_N) of the last micro-batch's kept tokens at logprob = lp_old, and the
    token's source; advantages scaled on the prefix tokens only."""
    inputs = dict(trainer.last_inputs)
    fields = OPDBatchFields.unpack(inputs)
    prefix_BT = fields.source_BT == int(TokenSource.PREFIX)
    inputs["advantages"] = torch.where(
        prefix_BT, inputs["advantages"] * advantage_scale, inputs["advantages"]
    )
    keep_BT = fields.keep_mask_BT.bool() & inputs["completion_mask"].bool()
    rows_N, cols_N = keep_BT.nonzero(as_tuple=True)
    old_BT = inputs.get("old_per_token_logps")
    start_N = torch.full((rows_N.numel(),), -1.5) if old_BT is None else old_BT[rows_N, cols_N]
    logprobs_N = start_N.clone().requires_grad_(True)
    trainer._policy_loss_N(inputs, fields, logprobs_N, rows_N, cols_N).sum().backward()
    return logprobs_N.grad, prefix_BT[rows_N, cols_N], inputs["advantages"][rows_N, cols_N]


PREFIX_RFT = {"opd_prefix_column": "solution", "opd_prefix_placement": "completion",
              "opd_prefix_guided": 1, "opd_prefix_fraction_start": 0.4,
              "opd_prefix_fraction_end": 0.4, "max_completion_length": 6,
              "max_steps": 1}  # fmt: skip


@pytest.mark.parametrize("prefix_loss", ["nll", "shaped"])
def test_prefix_tokens_are_never_trained_as_on_policy_tokens(tmp_path, tiny_student, prefix_loss):
    """Prefix-RFT's prefix heads the first member's completion; per kept token at lp = lp_old,
    the on-policy ratio's gradient is -A. The prefix tokens get NLL's -1 whatever their
    advantage, or LUFFY's -A * gamma * p / (p + gamma)^2, never -A."""
    trainer = train(tmp_path, tiny_student, opd_prefix_loss=prefix_loss, **PREFIX_RFT)
    [step] = trainer.recorded
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    for row, prompt in enumerate(step["prompts"]):
        ids = step["completion_ids"][row].tolist()
        if row % 2 == 0:
            solution = SOLUTIONS[PROMPTS.index(prompt)]
            assert ids[:2] == tokenizer.encode(solution[:2], add_special_tokens=False)
    grad_N, prefix_N, advantages_N = _policy_loss_gradient(trainer)
    assert prefix_N.sum() == 4  # 2 guided rows x 2 prefix tokens, all kept
    on_policy = ~prefix_N
    torch.testing.assert_close(grad_N[on_policy], -advantages_N[on_policy])
    if prefix_loss == "nll":
        torch.testing.assert_close(grad_N[prefix_N], torch.full((4,), -1.0))
        scaled, _, _ = _policy_loss_gradient(trainer, advantage_scale=1e3)
        torch.testing.assert_close(scaled, grad_N)
    else:
        gamma = trainer.args.opd_trace_gamma
        old_BT = trainer.last_inputs.get("old_per_token_logps")
        p = torch.full((4,), -1.5).exp() if old_BT is None else None
        assert p is not None, "TRL computed lp_old: adapt the expected p"
        expected = -advantages_N[prefix_N] * gamma * p / (p + gamma) ** 2
        torch.testing.assert_close(grad_N[prefix_N], expected)
    assert logged(trainer, "opd/prefix_guided_fraction") == [0.5]


# ----- TRACE -----

TRACE = {"teacher_context_column": "solution", "teacher_context_template": TEMPLATE,
         "trace_annotator": "divergence", "trace_reverse_kl": True, "trace_span_quantile": 0.5,
         "trace_span_min_tokens": 1, "opd_outcome_weight": 1.0, "opd_divergence": "forward_kl",
         "opd_divergence_support": "full", "opd_divergence_coef": 1.0, "beta": 0.0}  # fmt: skip


def test_trace_routes_each_token_to_one_term(tmp_path, tiny_student):
    """KL channels at full weight: key spans only on correct rows, error spans only on wrong
    ones; the advantage is the distillation term on error spans and the outcome elsewhere."""
    trainer = train(tmp_path, tiny_student, reward_funcs=[solved_prompt_reward], max_steps=1,
                    trace_kl_warmup_steps=5, **TRACE)  # fmt: skip
    [step] = trainer.recorded
    masks, mask_BT = step["term_masks"], step["mask_BT"]
    correct_B = torch.tensor([prompt == SOLVED for prompt in step["prompts"]])
    key_BT, error_BT = masks.forward_kl_BT.bool(), masks.reverse_kl_BT.bool()
    assert key_BT.any() and error_BT.any()
    assert not key_BT[~correct_B].any() and not error_BT[correct_B].any()
    assert torch.equal(masks.outcome_BT, (~(key_BT | error_BT)).float() * mask_BT)
    # each group is all correct or all wrong: TRL's group-normalised outcome advantage is 0
    term_BT = step["teacher_BT"] - step["student_old_BT"]
    torch.testing.assert_close(step["advantages_BT"], term_BT * error_BT * mask_BT)
    assert logged(trainer, "opd/trace_kl_coef") == [1.0]


def test_trace_with_its_kl_channels_annealed_away_is_plain_grpo(tmp_path, tiny_student):
    """No warm-up, no decay: the KL coefficient is 0 from step 0, every token goes back to the
    outcome term, and the run trains bit-equal to GRPO with no distillation term."""
    reward = {"reward_funcs": [solved_prompt_reward]}
    grpo = train(tmp_path / "grpo", tiny_student, opd_kl_coef=0.0, opd_outcome_weight=1.0,
                 beta=0.0, **reward)  # fmt: skip
    trace = train(tmp_path / "trace", tiny_student, trace_kl_warmup_steps=0,
                  trace_kl_decay_steps=0, **TRACE, **reward)  # fmt: skip
    assert logged(trace, "opd/trace_kl_coef") == [0.0, 0.0]
    assert logged(trace, "loss") == logged(grpo, "loss")
    assert_same_weights(weights(trace), weights(grpo))


# ----- several processes -----


def test_guided_rows_under_torchrun_are_the_global_first_members(tmp_path):
    """pope-tiny through the real CLI on 2 processes x 2 rows: the one group of 4 spans both,
    its first 2 members (process 0's rows) are guided and process 1's are not: 0.5 of the
    global batch (local row indices would guide both processes' rows: 1.0)."""
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "pope-tiny.yaml"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "opd.cli", "distill", "--config", str(recipe),
        "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path),
        "--write_report", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((tmp_path / "opd_results.json").read_text())["log_history"]
    guided = [entry["opd/prefix_guided_fraction"] for entry in history
              if "opd/prefix_guided_fraction" in entry]  # fmt: skip
    assert guided == [0.5, 0.5]


# ----- the prefix source from `opd rollout` -----


def ends_with_answer(completions, answer, **kwargs) -> list[float]:
    return [
        float(text.strip().endswith(gold)) for text, gold in zip(completions, answer, strict=True)
    ]


def test_prefixes_come_from_the_first_graded_success_of_a_rollout_set(tmp_path, tiny_student):
    """A rollout set (the `opd rollout` layout) with a success for "1+1=" only: its guided rows
    continue from 40% of that success; "2+2=" has none and stays unguided."""
    import pyarrow as pa

    from opd.shards import ShardSetWriter

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    rows = [(0, 0, "1+1=3"), (0, 1, "1+1=2"), (1, 0, "2+2=5")]  # prompt, sample, completion
    ids = [[*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
           for _, _, text in rows]  # fmt: skip
    table = pa.table({
        "prompt_index": pa.array([r[0] for r in rows], pa.int64()),
        "sample_index": pa.array([r[1] for r in rows], pa.int64()),
        "prompt_ids": pa.array([tokenizer(PROMPTS[r[0]])["input_ids"] for r in rows],
                               pa.list_(pa.int32())),
        "teacher_prompt_ids": pa.array([[] for _ in rows], pa.list_(pa.int32())),
        "completion_ids": pa.array(ids, pa.list_(pa.int32())),
        "sampler_logprobs": pa.array([[-1.0] * len(i) for i in ids], pa.list_(pa.float32())),
        "stop_reason": pa.array(["stop"] * len(rows)),
        "prompt": pa.array([PROMPTS[r[0]] for r in rows]),
        "answer": pa.array([["2", "4"][r[0]] for r in rows]),
    })  # fmt: skip
    plan = {"kind": "rollouts", "num_rows": 3, "num_shards": 1, "shard_size": 3}
    writer = ShardSetWriter(tmp_path / "rollouts", plan, rerun_hint="opd rollout")
    writer.start()
    writer.write_shard(0, table)
    writer.close()
    trainer = train(tmp_path / "run", tiny_student, reward_funcs=[ends_with_answer], max_steps=1,
                    opd_prefix_rollouts=str(tmp_path / "rollouts"), opd_prefix_guided=1,
                    opd_prefix_fraction_start=0.4, opd_prefix_fraction_end=0.4)  # fmt: skip
    assert trainer.prefix_sources == {prompt_key("1+1="): "1+1=2"}
    [step] = trainer.recorded
    for row, prompt in enumerate(step["prompts"]):
        expected = tokenizer.encode("1+", add_special_tokens=False)
        guided = prompt == "1+1=" and row % 2 == 0
        assert step["prefix_ids_B"][row] == (expected if guided else None)


class RecordingReward:
    """Records the completion texts TRL's rewards are given."""

    __name__ = "recording_reward"

    def __init__(self):
        self.completions: list[list[str]] = []

    def __call__(self, completions, **kwargs) -> list[float]:
        self.completions.append(list(completions))
        return [0.0] * len(completions)


@pytest.mark.parametrize("placement", ["prompt", "completion"])
def test_rewards_grade_the_whole_guided_solution(tmp_path, tiny_student, placement):
    """A guided rollout's answer may sit in its prefix: the rewards read prefix + continuation
    in both placements (the ids keep the placement's split)."""
    reward = RecordingReward()
    trainer = train(tmp_path, tiny_student, reward_funcs=[reward], max_steps=1,
                    opd_prefix_column="solution", opd_prefix_placement=placement,
                    opd_prefix_guided=1, opd_prefix_fraction_start=0.4,
                    opd_prefix_fraction_end=0.4, max_completion_length=6)  # fmt: skip
    [step] = trainer.recorded
    [texts] = reward.completions
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    for row, prompt in enumerate(step["prompts"]):
        ids = step["completion_ids"][row][step["mask_BT"][row].bool()].tolist()
        continuation = tokenizer.decode(ids, skip_special_tokens=True)
        if row % 2 == 0:  # guided: 40% of the solution, 2 tokens
            prefix = SOLUTIONS[PROMPTS.index(prompt)][:2]
            expected = continuation if placement == "completion" else prefix + continuation
            assert texts[row] == expected and texts[row].startswith(prefix)
        else:
            assert texts[row] == continuation


# ----- MOPD with a configured teacher, served over HTTP -----


def test_mopd_peer_contexts_reach_a_served_teacher(tmp_path, tiny_student, tiny_teacher,
                                                   teacher_backend, serve_teacher):  # fmt: skip
    """MOPD with the tiny teacher in-process (`local`) and behind `opd teacher serve` on
    loopback: the same peer-context teacher prompts travel with the request and the teacher's
    scores, hence the advantages, agree."""
    from opd.commands.serve import ServeArguments

    fields = {"reward_funcs": [alternate_reward], "max_steps": 1, "num_generations": 4,
              "mopd_peers": "contrastive", "mopd_success_label": "ok",
              "mopd_failure_label": "no", "teacher_context_template": TEMPLATE}  # fmt: skip
    local = train(tmp_path / "local", tiny_student, teacher_mode="local",
                  teacher_model_name_or_path=str(tiny_teacher), **fields)  # fmt: skip
    args = ServeArguments(model=str(tiny_teacher), port=0, log_level="warning")
    with serve_teacher(args, teacher_backend) as url:
        served = train(tmp_path / "served", tiny_student, teacher_mode="server",
                       teacher_urls=[url], **fields)  # fmt: skip
    [a], [b] = local.recorded, served.recorded
    assert a["teacher_prompt_ids"] == b["teacher_prompt_ids"]
    assert len({len(ids) for ids in a["teacher_prompt_ids"]}) > 1  # contexts differ per row
    torch.testing.assert_close(b["teacher_BT"], a["teacher_BT"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["advantages_BT"], a["advantages_BT"], atol=1e-5, rtol=0)


def test_pope_ledger_and_weights_survive_a_checkpoint_resume(tmp_path, tiny_student):
    """Step 3's guidance reads the ledger of steps 1-2: a resume that lost it would guide (and
    train) differently."""
    import shutil

    fields = {"reward_funcs": [solved_prompt_reward], "max_steps": 3,
              "save_strategy": "steps", "save_steps": 1, **POPE}  # fmt: skip
    whole = train(tmp_path / "whole", tiny_student, **fields)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = build(tmp_path / "resumed", tiny_student, **fields)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    [step3] = resumed.recorded
    assert step3["prefix_ids_B"] == whole.recorded[2]["prefix_ids_B"]
    assert any(step3["prefix_ids_B"])  # the restored ledger guided the failed prompt
    assert resumed.prefix_ledger.state_dict() == whole.prefix_ledger.state_dict()
    for name, value in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[name], value, atol=1e-6, rtol=0, msg=name)


def test_a_vllm_server_samples_guided_groups_one_completion_per_row(
    tmp_path, tiny_student, monkeypatch
):
    """TRL's server path samples `n = num_generations` completions of every group's first
    prompt; a guided group's rows differ by their prefix, so opd asks for one per row. A vLLM
    server cannot run on this CPU (tests/gpu/test_vllm_server_cuda.py needs 2 GPUs): TRL's
    method is replaced by a recorder here, and only the argument opd passes is checked."""
    from opd.trainer.trl_seams import GRPOTrainer

    trainer = build(tmp_path, tiny_student, opd_prefix_column="solution")
    seen = []
    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn",
                        lambda self, ids, images, fields, n, *args: seen.append(n))  # fmt: skip
    trainer.model.train()
    for mode, expected in (("colocate", 2), ("server", 1)):
        trainer.vllm_mode = mode
        trainer._generate_single_turn([[1, 2]], None, {}, 2)
        assert seen[-1] == expected
    trainer.model.eval()  # evaluation is unguided: the group shares one prompt
    trainer._generate_single_turn([[1, 2]], None, {}, 2)
    assert seen[-1] == 2


def first_character_spans(prompt: str, completion: str, correct: bool) -> list:
    """A `SpanAnnotator`: the completion's first character, "key" if correct else "error"."""
    return [(0, 1, "key" if correct else "error")] if completion else []


def test_trace_with_a_span_annotator_routes_its_character_spans(tmp_path, tiny_student):
    """An annotator's character spans become token masks: with the demo's one character per
    token, exactly each completion's first token is routed (key on correct rows, error on
    wrong ones); the annotator saw the prompt text and the decoded completion."""
    calls = []

    def annotate(prompt, completion, correct):
        calls.append((prompt, completion, correct))
        return first_character_spans(prompt, completion, correct)

    trainer = build(tmp_path, tiny_student, reward_funcs=[solved_prompt_reward], max_steps=1,
                    trace_kl_warmup_steps=5, **TRACE)  # fmt: skip
    trainer.span_annotator = annotate  # what trace_annotator: module.function loads
    trainer.train()
    [step] = trainer.recorded
    masks, mask_BT = step["term_masks"], step["mask_BT"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    for row, prompt in enumerate(step["prompts"]):
        ids = step["completion_ids"][row][mask_BT[row].bool()].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        first_BT = torch.zeros_like(mask_BT[row])
        first_BT[0] = float(bool(text))  # the first valid token holds the first character
        routed = masks.forward_kl_BT[row] if prompt == SOLVED else masks.reverse_kl_BT[row]
        assert torch.equal(routed, first_BT)
        assert calls[row] == (prompt, text, prompt == SOLVED)
