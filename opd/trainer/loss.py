"""Phase 2 of `OPDTrainer`: the loss of one micro-batch, on the kept positions only.

The kept positions' final hidden states go through the lm_head in `opd.kernels` (fused, chunked:
never `[tokens x vocab]` logits; tokens TIP dropped cost nothing), giving the surrogate
`-rho_t * A_t` (`opd/objectives/surrogate.py`), TRL's `beta` KL to the initial policy, and the
optional supervised divergence term (family B).

Normalisation across processes and micro-batches: every token-normalised term divides by the
kept tokens of the whole *global* generation batch (counted once, in phase 1), scaled so that
DDP's gradient average and the Trainer's sum over accumulation steps give exactly the mean over
all kept tokens. N processes x batch B therefore train the same model as 1 process x batch N*B.

Test: `pytest tests/integration/test_methods.py tests/integration/test_multiprocess.py`.
"""

from __future__ import annotations

from math import nan
from typing import Any

import torch

from opd.kernels import fused_linear_divergence_loss, fused_linear_token_stats
from opd.objectives.hidden import completion_hidden_states, prompt_completion_ids
from opd.objectives.surrogate import policy_loss_N, reduce_loss, reference_kl_N
from opd.trainer.distributed import global_count
from opd.trainer.sharding import full_lm_head_weight
from opd.types import CrossVocab, OPDBatchFields, PrefixLoss, TokenSource


class LossMixin:
    """`_compute_loss` of `OPDTrainer`; `self` is the trainer (a `GRPOTrainer`)."""

    def _compute_loss(self, model, inputs):
        fields = OPDBatchFields.unpack(inputs)
        mask_BT = inputs["completion_mask"].float()
        if "tool_mask" in inputs:
            mask_BT = mask_BT * inputs["tool_mask"]
        keep_BT = fields.keep_mask_BT.bool() & mask_BT.bool()
        rows_N, cols_N = keep_BT.nonzero(as_tuple=True)
        input_ids, attention_mask = prompt_completion_ids(inputs)
        hidden_BTH = completion_hidden_states(
            model, input_ids, attention_mask, inputs["completion_ids"].shape[1]
        )
        # Every process takes this same path, even with no kept token here (e.g. TIP's Q3 kept
        # none of its rows): the lm_head gather and the metric gathers are collectives.
        hidden_NH = hidden_BTH[rows_N, cols_N]
        weight_VH = full_lm_head_weight(self.accelerator.unwrap_model(model))
        token_N = fused_linear_token_stats(
            hidden_NH, weight_VH, inputs["completion_ids"][rows_N, cols_N],
            temperature=self.temperature,
        )  # fmt: skip
        loss_N = self._policy_loss_N(inputs, fields, token_N["logprob"], rows_N, cols_N)
        loss = self._reduce(loss_N, rows_N, inputs, mask_BT.shape[0])
        if self.args.uses_divergence_term:
            loss = loss + self._divergence_loss(
                inputs, fields, hidden_NH, weight_VH, rows_N, cols_N
            )
        loss = self.with_imitation(model, inputs, fields, loss, weight_VH)  # CHORD, DYPO
        # No kept token: a zero loss that still reaches every parameter (DDP waits for them all).
        loss = loss + 0.0 * (hidden_BTH.sum() + weight_VH.sum())
        self.log_loss_metrics(token_N, loss.detach())
        return loss

    def _policy_loss_N(self, inputs, fields, logprobs_N, rows_N, cols_N) -> torch.Tensor:
        """The surrogate of each kept token (trace rows: LUFFY's shaping), with TRL's vLLM
        importance correction (not with the s.10 forms: they weigh against the sampler
        already) and its `beta` KL to the reference."""
        old_BT = inputs.get("old_per_token_logps")
        old_N = logprobs_N.detach() if old_BT is None else old_BT[rows_N, cols_N]
        offpolicy_N = fields.offpolicy_B[rows_N]
        prefix_N = torch.zeros_like(offpolicy_N)
        if fields.source_BT is not None:  # Prefix-RFT: never trained as on-policy tokens
            prefix_N = fields.source_BT[rows_N, cols_N] == int(TokenSource.PREFIX)
            if self.args.opd_prefix_loss == PrefixLoss.SHAPED:
                offpolicy_N = offpolicy_N | prefix_N
        if self.args.uses_offpolicy_ratio:
            loss_N = self.offpolicy_policy_loss_N(inputs, fields, logprobs_N, rows_N, cols_N)
        else:
            loss_N = policy_loss_N(
                logprobs_N, old_N, inputs["advantages"][rows_N, cols_N],
                ratio=self.args.opd_ratio, epsilon_low=self.epsilon_low,
                epsilon_high=self.epsilon_high, offpolicy_N=offpolicy_N,
                trace_gamma=self.args.opd_trace_gamma, delta=self.args.delta,
            )  # fmt: skip
            if fields.behaviour_logprobs_BT is not None:  # ESS etc. against the sampler
                self.log_sampler_importance(inputs, fields, logprobs_N.detach(), rows_N, cols_N)
        if (
            self.use_vllm
            and self.vllm_importance_sampling_correction
            and (not self.args.uses_offpolicy_ratio)
        ):
            ratio_BT = inputs["importance_sampling_ratio"].expand_as(inputs["completion_mask"])
            ratio_N = ratio_BT[rows_N, cols_N]
            # a trace has no sampler: no vLLM/trainer correction
            ratio_N = torch.where(offpolicy_N | prefix_N, 1.0, ratio_N)
            loss_N = loss_N * ratio_N
        if self.args.opd_prefix_loss == PrefixLoss.NLL:  # supervised prefix tokens
            loss_N = torch.where(prefix_N, -logprobs_N, loss_N)
        if self.beta != 0.0:
            reference_N = inputs["ref_per_token_logps"][rows_N, cols_N]
            corrected = self.args.use_bias_correction_kl  # TRL's default: times the ratio
            reference_kl = reference_kl_N(logprobs_N, reference_N, old_N if corrected else None)
            self.record("opd/reference_kl", float(reference_kl.detach().mean()))
            loss_N = loss_N + self.beta * reference_kl
        self.log_ratio_metrics(logprobs_N.detach() - old_N)
        return loss_N

    def _reduce(self, loss_N, rows_N, inputs, num_rows: int) -> torch.Tensor:
        """TRL's normalisation for `loss_type`, exact across processes and accumulation steps.

        grpo and dr_grpo are means over rows (TRL gives every process and micro-batch the same
        number), so DDP's average and the `1/accumulation` scaling make the global mean. The
        token-normalised forms divide by global counts: dapo/cispo by the kept tokens of the
        whole generation batch (see `_token_normalizer`); bnpo by the kept tokens of this
        micro-batch on all processes (its definition: one micro-batch, TRL's is per process).
        """
        training = self.model.training
        normalizer = None
        if self.loss_type in ("dapo", "cispo"):
            normalizer = self._token_normalizer(inputs)
        elif self.loss_type == "bnpo":
            kept = global_count(self.accelerator, torch.tensor(rows_N.numel()))
            normalizer = max(kept, 1.0) / self.accelerator.num_processes
            if training:
                normalizer *= self.current_gradient_accumulation_steps
        loss = reduce_loss(
            loss_N, rows_N, num_rows, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length, token_normalizer=normalizer,
        )  # fmt: skip
        if normalizer is None and training:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _token_normalizer(self, inputs) -> float:
        """What one micro-batch's token sum is divided by so that, after DDP's average over N
        processes and the sum over accumulation steps, the loss is the mean over every kept
        token of the generation batch (`num_items_in_batch`, counted on all processes)."""
        kept = max(float(inputs["num_items_in_batch"]), 1.0)  # TRL clamps the count, then divides
        normalizer = kept / self.accelerator.num_processes
        if self.model.training:
            normalizer *= self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _divergence_loss(
        self, inputs, fields: OPDBatchFields, hidden_NH, weight_VH, rows_N, cols_N
    ) -> torch.Tensor:
        """coef * mean over kept tokens of D(p_s, sg(p_t)) (family B), fused with the lm_head."""
        args = self.args
        teacher: dict[str, Any] = {}
        if args.uses_full_divergence:
            assert fields.teacher_hidden_BTH is not None, "packed in phase 1"
            teacher["teacher_hidden"] = fields.teacher_hidden_BTH[rows_N, cols_N]
            teacher["teacher_weight"] = self.teacher_output_weight()
        else:
            assert fields.teacher_topk_ids_BTK is not None, "packed in phase 1"
            assert fields.teacher_topk_logprobs_BTK is not None, "packed in phase 1"
            teacher["teacher_topk_ids"] = fields.teacher_topk_ids_BTK[rows_N, cols_N]
            teacher["teacher_topk_logprobs"] = fields.teacher_topk_logprobs_BTK[rows_N, cols_N]
        # The mean over the generation batch's kept tokens on all processes, like dapo.
        weight = 1.0 / self._token_normalizer(inputs)
        weight_N = torch.full((rows_N.numel(),), weight, device=hidden_NH.device)
        if fields.divergence_mask_BT is not None:  # TRACE's forward-KL channel, MOPD's rows
            weight_N = weight_N * fields.divergence_mask_BT[rows_N, cols_N]
        loss = hidden_NH.new_zeros(())
        if args.opd_cross_vocab != CrossVocab.ULD or not args.teacher_cross_tokenizer:
            loss, divergence_N = fused_linear_divergence_loss(
                hidden_NH, weight_VH, **teacher, weight=weight_N,
                kind=args.opd_divergence, beta=args.opd_divergence_beta,
                temperature=args.opd_divergence_temperature,
            )  # fmt: skip
            divergence = float(divergence_N.mean()) if divergence_N.numel() else nan
            self.record("opd/divergence", divergence)
        if fields.teacher_unmatched_logprobs_BTK is not None:  # a teacher of another vocabulary
            uld = self.uld_loss(fields, hidden_NH, weight_VH, weight_N, rows_N, cols_N)
            loss = loss + args.opd_cross_vocab_uld_weight * uld
        return args.opd_divergence_coef * loss
