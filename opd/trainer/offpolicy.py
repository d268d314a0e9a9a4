"""The off-policy and mixed-policy family of METHODS.md s.10, as an `OPDTrainer` mixin.

- **Ratio forms** (`opd_ratio`: topr, dispo, minpro, ctpo, sapo, bapo): the surrogate of each kept
  token from `opd/objectives/offpolicy.py`, with importance weights against the *sampler's*
  logprobs (vLLM's, or those stored with Lightning's rollouts), so TRL's vLLM correction is not
  applied a second time. Every run with sampler logprobs logs the ESS, ratio quantiles and the
  clipped fraction by the sign of the advantage (`opd/is_*`).
- **VCPO** (`opd_lr_ess_scaling`, `opd_baseline: min_variance`): phase 1 computes the current
  policy's weights against the sampler over the global batch; their ESS scales the learning rate
  of the step's optimizer updates (through optimizer hooks: Adam would cancel a loss scale), and
  the w^2-weighted group mean of the OPD reward is the composer's baseline.
- **Gated LUFFY insertion** (`opd_trace_gate`, `opd_trace_cache`): the on-policy rollouts are graded
  before the trace replaces a group member; per-prompt counts and cached successes live in a
  `PromptLedger`, identical on every process and saved with each checkpoint.
- **Imitation** (`opd_imitation_column`: CHORD; `opd_imitation_gate: all_fail`: DYPO): one expert
  trace per prompt as a separate stream; loss = (1 - mu) * loss + mu * weighted NLL.
- **TCOD** (`tcod_unit`): the OPD term on the first D(step) tokens or steps.

Test: `pytest tests/integration/test_offpolicy_methods.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate.utils import gather_object

from opd.kernels import fused_linear_token_stats
from opd.objectives.curriculum import DepthSchedule, curriculum_depth, depth_mask_BT
from opd.objectives.hidden import completion_hidden_states
from opd.objectives.imitation import (
    ImitationSchedule,
    dypo_gate_B,
    expert_token_weight_N,
    imitation_coefficient,
    imitation_loss_N,
)
from opd.objectives.offpolicy import (
    RatioSettings,
    bapo_clip_bounds,
    importance_stats,
    offpolicy_surrogate_BT,
)
from opd.objectives.surrogate import luffy_shaped_loss_N
from opd.objectives.vcpo import LearningRateScale, ess_lr_scale, min_variance_baseline_BT
from opd.rewards import completion_text
from opd.rollout.trace_gate import (
    PromptLedger,
    insert_groups_G,
    load_ledger,
    prompt_key,
    save_ledger,
)
from opd.trainer.distributed import gather_rows, on_global_batch
from opd.types import Baseline, DepthUnit, ImitationGate, OPDBatchFields, Ratio, TraceGate

LEDGER_FILE = "opd_trace_ledger.json"
IMITATION_TOKENS = "opd_imitation_tokens"  # a 0-dim batch key: TRL copies it to every micro-batch
BAPO_BOUNDS = ("opd_bapo_low", "opd_bapo_high")  # 0-dim batch keys too


class OffPolicyMixin:
    """Hooks used by `OPDTrainer`; `self` is the trainer (a `GRPOTrainer`)."""

    # ----- ratio forms (loss phase) -----

    def offpolicy_policy_loss_N(self, inputs, fields: OPDBatchFields, logprobs_N, rows_N, cols_N):
        """The s.10 ratio form of each kept token; trace rows keep LUFFY's shaped ratio."""
        keep_BT, logprobs_BT = _sampled_rows_BT(inputs, fields, logprobs_N, rows_N, cols_N)
        behaviour_BT = self.behaviour_logprobs_BT(inputs, fields, logprobs_BT)
        advantages_BT = inputs["advantages"]
        bounds = None
        if BAPO_BOUNDS[0] in inputs:  # chosen in phase 1 over the global generation batch
            bounds = tuple(float(inputs[key]) for key in BAPO_BOUNDS)
        terms = offpolicy_surrogate_BT(
            logprobs_BT, behaviour_BT, advantages_BT, keep_BT.float(), fields.correct_B,
            ratio=self.args.opd_ratio, settings=self.ratio_settings, bapo_bounds=bounds,
        )  # fmt: skip
        loss_N = terms.loss_BT[rows_N, cols_N]
        shaped_N = luffy_shaped_loss_N(
            logprobs_N, advantages_BT[rows_N, cols_N], gamma=self.args.opd_trace_gamma
        )
        loss_N = torch.where(fields.offpolicy_B[rows_N], shaped_N, loss_N)
        log_ratio_BT = logprobs_BT.detach() - behaviour_BT
        self.log_importance_stats(log_ratio_BT, keep_BT, advantages_BT, terms.clipped_BT)
        return loss_N

    def log_sampler_importance(self, inputs, fields, logprobs_N, rows_N, cols_N) -> None:
        """The importance statistics of plain/ppo/cispo runs, against the sampler too."""
        keep_BT, logprobs_BT = _sampled_rows_BT(inputs, fields, logprobs_N, rows_N, cols_N)
        behaviour_BT = self.behaviour_logprobs_BT(inputs, fields, logprobs_BT)
        self.log_importance_stats(logprobs_BT - behaviour_BT, keep_BT, inputs["advantages"])

    def behaviour_logprobs_BT(self, inputs, fields: OPDBatchFields, logprobs_BT):
        """lp_old of the ratio forms: the sampler's logprob where it has one, else TRL's old
        logprob (several updates per batch), else the current one (on-policy: ratio 1)."""
        fallback_BT = inputs.get("old_per_token_logps")
        if fallback_BT is None:
            fallback_BT = logprobs_BT.detach()
        sampler_BT = fields.behaviour_logprobs_BT
        if sampler_BT is None:
            return fallback_BT.detach()
        return torch.where(torch.isnan(sampler_BT), fallback_BT, sampler_BT).detach()

    def log_importance_stats(self, log_ratio_BT, keep_BT, advantages_BT, clipped_BT=None):
        """ESS, ratio quantiles and clipped fractions by sign (a collective: same names on all
        processes; a NaN, e.g. no kept token here, is left out of the mean)."""
        stats = importance_stats(log_ratio_BT, keep_BT.float(), advantages_BT, clipped_BT)
        for name in sorted(stats):
            self.record(f"opd/is_{name}", stats[name])

    def choose_bapo_bounds(self, step, output, advantages_BT) -> None:
        """BAPO's clip bounds for this generation batch, from the current policy's weights
        against the sampler over all processes' rows (so N processes train as one), into the
        batch dict for every micro-batch of the step."""
        if self.args.opd_ratio != Ratio.BAPO:
            return
        log_w_BT = step.log_weights_BT
        if log_w_BT is None:
            log_w_BT = self.importance_log_weights_BT(step, output)
        correct_B = step.correct_B().float() if self.has_rewards else None
        gathered = [
            gather_rows(self.accelerator, t) for t in (log_w_BT, advantages_BT, step.mask_BT)
        ]
        log_w, advantages, mask = gathered
        if correct_B is None:
            positive = advantages > 0
        else:
            positive = gather_rows(self.accelerator, correct_B).bool()[:, None].expand_as(mask)
        low, high = bapo_clip_bounds(log_w, advantages, mask, positive, self.ratio_settings)
        device = step.mask_BT.device
        output[BAPO_BOUNDS[0]] = torch.tensor(low, device=device)
        output[BAPO_BOUNDS[1]] = torch.tensor(high, device=device)
        self.record("opd/bapo_clip_low", low)
        self.record("opd/bapo_clip_high", high)

    # ----- VCPO (phase 1) -----

    def importance_log_weights_BT(self, step, output) -> torch.Tensor:
        """log w = lp_current - lp_sampler per token (0 on traces, where the sampler gave none,
        and without sampler logprobs: on-policy)."""
        sampler_BT = output.get("sampling_per_token_logps")
        if sampler_BT is None:
            return torch.zeros_like(step.mask_BT)
        current_BT = step.student_old_BT if self.offline is not None else None
        if current_BT is None or current_BT is sampler_BT:
            current_BT = self._trainer_logprobs(output)
        log_w_BT = (current_BT.float() - sampler_BT.float()) * step.mask_BT
        return torch.nan_to_num(log_w_BT, nan=0.0).clamp(-30.0, 30.0)

    def apply_vcpo(self, step, output) -> None:
        """Set the learning-rate scale of this generation step's updates from the ESS of the
        global batch's importance weights; keep the weights for the baseline."""
        args = self.args
        if not args.needs_importance_weights:
            return
        step.log_weights_BT = self.importance_log_weights_BT(step, output)
        weights_BT = torch.exp(step.log_weights_BT.double()) * step.mask_BT
        local = torch.stack([weights_BT.sum(), (weights_BT**2).sum(), step.mask_BT.sum().double()])
        total, squares, count = self.accelerator.gather(local[None]).sum(0).tolist()
        fraction = 1.0 if count == 0 else total**2 / (count * max(squares, 1e-300))
        self.record("opd/ess_fraction", fraction)
        if args.opd_lr_ess_scaling and self.model.training:
            scale = ess_lr_scale(min(fraction, 1.0))
            self.learning_rate_scale().scale = scale
            self.record("opd/lr_scale", scale)

    def learning_rate_scale(self) -> LearningRateScale:
        """The hooks on the torch optimizer (under accelerate's wrapper), attached once."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        hooked = getattr(self, "_lr_scale", None)
        if hooked is None or hooked.optimizer is not optimizer:
            self._lr_scale = LearningRateScale(optimizer)
        return self._lr_scale

    def offpolicy_baseline_BT(self, step, term_BT) -> torch.Tensor | None:
        """VCPO's min-variance baseline of the OPD reward, per group over the global batch."""
        if self.args.opd_baseline != Baseline.MIN_VARIANCE:
            return None
        baseline = lambda term, log_w, mask: min_variance_baseline_BT(  # noqa: E731
            term, log_w, mask, group_size=self.num_generations
        )
        log_weights_BT, mask_BT = step.log_weights_BT, step.mask_BT
        return on_global_batch(self.accelerator, baseline, term_BT, log_weights_BT, mask_BT)

    # ----- gated LUFFY insertion (generation) -----

    def gate_trace_rows(self, prompts, generated, rows, traces) -> tuple[list[int], list]:
        """The trace rows whose group the gate opens, and each row's trace (BEPA: the prompt's
        cached own success first). Grades the on-policy rollouts of the whole global batch."""
        args, group = self.args, self.num_generations
        rewards_NF = self._graded_rewards(prompts, generated)  # global rows
        correct_GN = (torch.nan_to_num(rewards_NF[:, 0].float(), nan=0.0) >= 0.5).view(-1, group)
        all_prompts = gather_object(list(prompts))
        keys_G = [prompt_key(all_prompts[g * group]) for g in range(correct_GN.shape[0])]
        generator = torch.Generator().manual_seed(args.seed * 100_003 + self.state.global_step)
        ledger = self.trace_ledger
        insert_G = insert_groups_G(
            args.opd_trace_gate, keys_G, correct_GN.cpu(), ledger,
            threshold=args.opd_trace_gate_threshold, generator=generator,
        )  # fmt: skip
        first = self.accelerator.process_index * len(prompts)
        kept = [row for row in rows if bool(insert_G[(first + row) // group])]
        traces = list(traces)
        for row in kept:
            traces[row] = ledger.trace_for(keys_G[(first + row) // group], traces[row])
        texts_N = gather_object([completion_text(c) for c in generated[3]])
        texts_GN = [texts_N[g * group : (g + 1) * group] for g in range(len(keys_G))]
        ledger.update(keys_G, correct_GN.cpu(), texts_GN, cache_successes=args.opd_trace_cache)
        self.record("opd/trace_insert_fraction", float(insert_G.float().mean()))
        return kept, traces

    def _graded_rewards(self, prompts, generated) -> torch.Tensor:
        """TRL's rewards of the freshly generated (all on-policy) rows, before any trace."""
        _, completion_ids, _, completions, *_ = generated
        return self.trl_rewards(self.step_state.inputs, prompts, completions, completion_ids)

    def save_method_state(self, checkpoint: Path) -> None:
        if self.trace_ledger is not None and self.args.should_save:
            save_ledger(self.trace_ledger, checkpoint / LEDGER_FILE)

    def load_method_state(self, checkpoint: str | Path) -> None:
        saved = load_ledger(Path(checkpoint) / LEDGER_FILE)
        if self.trace_ledger is not None and saved is not None:
            self.trace_ledger = saved

    # ----- imitation of expert traces (CHORD, DYPO) -----

    def imitation_fields(self, step, output) -> dict[str, torch.Tensor]:
        """One expert trace per prompt (the group's first row), tokenized after the row's
        prompt; DYPO keeps only prompts whose group failed. Also the global expert-token count."""
        args = self.args
        column = args.opd_imitation_column
        if column is None or not self.model.training:
            return {}
        if column not in step.inputs[0]:
            raise ValueError(f"opd_imitation_column={column!r} is not a column of the dataset.")
        num_rows, device = len(step.inputs), step.mask_BT.device
        first = self.accelerator.process_index * num_rows
        group = self.num_generations
        take_B = torch.tensor([(first + row) % group == 0 for row in range(num_rows)])
        if args.opd_imitation_gate == ImitationGate.ALL_FAIL:
            gate = lambda correct: dypo_gate_B(correct, group_size=self.num_generations)  # noqa: E731
            take_B &= on_global_batch(self.accelerator, gate, step.correct_B().cpu()).cpu()
        tokenizer = self.processing_class
        rows_ids = []
        for row, example in enumerate(step.inputs):
            text = example.get(column) if bool(take_B[row]) else None
            ids = tokenizer.encode(str(text), add_special_tokens=False) if text else []
            ids = [*ids[: self.max_completion_length - 1], tokenizer.eos_token_id] if ids else []
            rows_ids.append(ids)
        width = max(1, max(len(ids) for ids in rows_ids))
        ids_BL = torch.full((num_rows, width), tokenizer.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros(num_rows, width)
        for row, ids in enumerate(rows_ids):
            ids_BL[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask_BL[row, : len(ids)] = 1.0
        output[IMITATION_TOKENS] = self.accelerator.gather(mask_BL.sum().to(device)[None]).sum()
        return {"imitation_ids_BL": ids_BL.to(device), "imitation_mask_BL": mask_BL.to(device)}

    def imitation_coefficient(self) -> float:
        args = self.args
        schedule = ImitationSchedule(
            peak=args.opd_imitation_peak, valley=args.opd_imitation_valley,
            warmup_steps=args.opd_imitation_warmup_steps,
            decay_steps=args.opd_imitation_decay_steps,
        )  # fmt: skip
        return imitation_coefficient(self.state.global_step, schedule)

    def with_imitation(self, model, inputs, fields: OPDBatchFields, loss, weight_VH):
        """(1 - mu) * loss + mu * (expert tokens' weighted NLL, a mean over the generation
        batch's expert tokens on all processes); `loss` unchanged when mu is 0."""
        if fields.imitation_mask_BL is None or not self.model.training:
            return loss
        mu = self.imitation_coefficient()
        self.record("opd/imitation_coef", mu)
        if mu == 0.0:
            return loss
        mask_BL = fields.imitation_mask_BL
        rows = mask_BL.sum(1).nonzero()[:, 0]
        if rows.numel() == 0:  # still one forward: under FSDP the forward is a collective
            rows = torch.zeros(1, dtype=torch.long, device=mask_BL.device)
        input_ids = torch.cat([inputs["prompt_ids"][rows], fields.imitation_ids_BL[rows]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"][rows], mask_BL[rows].long()], 1)
        hidden_BLH = completion_hidden_states(model, input_ids, attention_mask, mask_BL.shape[1])
        keep_BL = mask_BL[rows].bool()
        token_N = fused_linear_token_stats(
            hidden_BLH[keep_BL], weight_VH, fields.imitation_ids_BL[rows][keep_BL]
        )
        logprobs_N = token_N["logprob"]
        weight_N = expert_token_weight_N(logprobs_N, kind=self.args.opd_imitation_token_weight)
        nll = imitation_loss_N(logprobs_N, weight_N).sum() / self._imitation_normalizer(inputs)
        nll = nll + 0.0 * hidden_BLH.sum()  # every parameter in the graph on every process
        nll_mean = float(-logprobs_N.detach().mean()) if logprobs_N.numel() else math.nan
        self.record("opd/imitation_nll", nll_mean)
        return (1.0 - mu) * loss + mu * nll

    def _imitation_normalizer(self, inputs) -> float:
        """As `_token_normalizer`, with the generation batch's expert tokens."""
        count = max(float(inputs[IMITATION_TOKENS]), 1.0) / self.accelerator.num_processes
        return count * self.current_gradient_accumulation_steps / self.args.steps_per_generation

    # ----- TCOD depth curriculum -----

    def tcod_term(self, term_BT, output, mask_BT) -> torch.Tensor:
        """The OPD term on the first D(step) tokens or steps of each completion."""
        args = self.args
        if args.tcod_unit == DepthUnit.NONE:
            return term_BT
        schedule = DepthSchedule(
            start=args.tcod_start, end=args.tcod_end, ramp_steps=args.tcod_ramp_steps,
            unit=str(args.tcod_unit),
        )  # fmt: skip
        depth = curriculum_depth(self.state.global_step, schedule)
        step_end_BT = None
        if args.tcod_unit == DepthUnit.STEPS:
            ids_BT = output["completion_ids"]
            step_ids = torch.tensor(sorted(self.sod_step_ids), device=ids_BT.device)
            step_end_BT = torch.isin(ids_BT, step_ids)
        self.record("opd/tcod_depth", float(depth))
        return term_BT * depth_mask_BT(mask_BT, depth, step_end_BT=step_end_BT)

    def build_trace_ledger(self) -> PromptLedger | None:
        args = self.args
        gated = args.opd_trace_gate != TraceGate.ALWAYS or args.opd_trace_cache
        return PromptLedger() if gated else None

    def build_ratio_settings(self) -> RatioSettings:
        return RatioSettings.from_mapping(self.args.opd_ratio_settings)


def _sampled_rows_BT(inputs, fields: OPDBatchFields, logprobs_N, rows_N, cols_N):
    """`(keep_BT, logprobs_BT)`: the kept tokens the sampler produced (not traces: they have no
    sampler, so no ratio) and the kept tokens' logprobs scattered to `[B, T]` (0 elsewhere;
    differentiable when `logprobs_N` is)."""
    shape_BT = inputs["completion_mask"].shape
    keep_BT = torch.zeros(shape_BT, dtype=torch.bool, device=logprobs_N.device)
    keep_BT[rows_N, cols_N] = True
    keep_BT &= ~fields.offpolicy_B[:, None]
    logprobs_BT = logprobs_N.new_zeros(shape_BT).index_put((rows_N, cols_N), logprobs_N)
    return keep_BT, logprobs_BT
