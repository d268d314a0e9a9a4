"""The per-step metrics of METHODS.md ("Signals to log on every run"), as an `OPDTrainer` mixin.

Every value is averaged over processes (`record` gathers it) and goes into TRL's metric buffer,
so it reaches `report_to` like any TRL metric and is logged once, by the main process.

Test: `pytest tests/integration/test_methods.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from opd.objectives.repetition import repetition_rate
from opd.trainer.trl_seams import append_metric
from opd.types import OPDBatchFields, Ratio, TokenStats


class MetricsMixin:
    """Metric hooks of `OPDTrainer`; `self` is the trainer (a `GRPOTrainer`)."""

    def record(self, name: str, value: float) -> None:
        """Log the mean over processes of `value` (NaN: this process has none).

        A collective: every process must call it with the same names in the same order.
        """
        mode = "train" if self.model.training else "eval"
        local = torch.tensor([value], dtype=torch.float32, device=self.accelerator.device)
        mean = float(self.accelerator.gather(local).nanmean())
        if not math.isnan(mean):
            append_metric(self, mode, name, mean)

    def record_token_means(self, values_BT: dict[str, torch.Tensor], mask_BT) -> None:
        """Log each `[B, T]` value's mean over the valid tokens of all processes (one gather of
        sums and counts: exact when processes hold different numbers of tokens)."""
        names = list(values_BT)
        sums = [(values_BT[name].float() * mask_BT).sum() for name in names]
        local = torch.stack([*sums, mask_BT.sum()]).reshape(1, -1).float()
        totals = self.accelerator.gather(local).sum(dim=0)
        mode = "train" if self.model.training else "eval"
        count = float(totals[-1])
        for name, total in zip(names, totals[:-1].tolist(), strict=True):
            if count > 0:
                append_metric(self, mode, name, total / count)

    def log_generation_metrics(
        self, step, output, advantages_BT, loss_fields: OPDBatchFields
    ) -> None:
        student_old_BT, scores, mask_BT = step.student_old_BT, step.scores, step.mask_BT
        teacher_BT = scores.sampled_logprobs_BT.to(student_old_BT.device)
        token_values = {
            "opd/reverse_kl_k1": student_old_BT - teacher_BT,
            "opd/teacher_logprob": teacher_BT,
            "opd/student_logprob": student_old_BT,
            "opd/advantage_mean": advantages_BT,
            "opd/kept_fraction": loss_fields.keep_mask_BT.float(),
            **_stat_metrics(step.stats_BT),
        }
        self.record_token_means(token_values, mask_BT)
        valid = mask_BT.bool()
        values = {
            "opd/advantage_std": float(advantages_BT[valid].std()) if valid.sum() > 1 else 0.0,
            "opd/repetition_rate": repetition_rate(_completion_lists(output)),
            "opd/offpolicy_fraction": float(loss_fields.offpolicy_B.float().mean()),
            **scores.metrics,
        }
        if self.has_rewards:
            values["opd/accuracy"] = float(step.correct_B().float().mean())
        for name, value in values.items():
            self.record(name, value)

    def log_ratio_metrics(self, log_ratio_N: torch.Tensor) -> None:
        empty = log_ratio_N.numel() == 0  # still record: `record` is a collective
        ratio_N = torch.exp(log_ratio_N)
        self.record("opd/ratio_mean", math.nan if empty else float(ratio_N.mean()))
        self.record("opd/ratio_max", math.nan if empty else float(ratio_N.max()))
        self.record("opd/ratio_min", math.nan if empty else float(ratio_N.min()))
        if self.args.opd_ratio == Ratio.PPO:
            clipped = (ratio_N < 1 - self.epsilon_low) | (ratio_N > 1 + self.epsilon_high)
            self.record("opd/clip_fraction", math.nan if empty else float(clipped.float().mean()))

    def log_loss_metrics(self, token_N: dict[str, Any], loss) -> None:
        self.record("opd/loss", float(loss))
        entropy_N = token_N["entropy"].detach()
        self.record("opd/kept_entropy", float(entropy_N.mean()) if entropy_N.numel() else math.nan)


def _stat_metrics(stats_BT: TokenStats | None) -> dict[str, torch.Tensor]:
    """The token statistics logged as `opd/<name>` means (those computed this step)."""
    if stats_BT is None:
        return {}
    logged = {
        "opd/reverse_kl": stats_BT.reverse_kl,
        "opd/entropy": stats_BT.entropy,
        "opd/topk_mass": stats_BT.topk_mass,
        "opd/baseline_kl": stats_BT.baseline_kl,
        "opd/jsd": stats_BT.jsd,
    }
    return {name: values_BT for name, values_BT in logged.items() if values_BT is not None}


def _completion_lists(output) -> list[list[int]]:
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)
    ]
