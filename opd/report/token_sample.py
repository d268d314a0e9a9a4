"""A per-step sample of TIP's token axes, for the report's entropy-vs-divergence scatter.

The trainer logs only batch means; the TIP scatter needs tokens. When `tip_rule != "none"`, the
trainer's `keep_mask` calls `append_tip_token_sample` (main process, training steps only), which
appends one JSON line to `output_dir/opd_tip_tokens.jsonl`:

    {"step": 12, "rule": "q3", "h": [...], "j": [...] | null, "kept": [0, 1, ...],
     "h_threshold": 0.41, "j_threshold": 0.27, "entropy_quantile": 0.5,
     "divergence_quantile": 0.8, "num_valid": 1830}

`h = H / ln V` and `j = JSD / ln 2` are the axes of `opd/objectives/tip.py` (both in [0, 1]);
the thresholds are that step's q3 thresholds (quantiles of h and j over all valid tokens of the
local batch); `j` and `j_threshold` are null when the rule does not compute the divergence
(entropy-only `entropy_sample`). At most `MAX_TOKENS` valid tokens are drawn per step, seeded by
the step, and only on a log-thinned set of steps (`is_sampled_step`), so the file stays near
1 MB even for a 10,000-step run. Step 1 starts a fresh file (a new run in the same output_dir);
a resumed run appends, and the reader keeps the last line of each step.

Test: `pytest tests/unit/test_report_token_sample.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opd.objectives.tip import batch_quantile, tip_axes
from opd.report.run_log import TIP_TOKENS_FILE

MAX_TOKENS = 256


def is_sampled_step(step: int) -> bool:
    """Every step below 100, then every 10th below 1000, every 100th below 10000, and so on."""
    return step >= 1 and step % 10 ** max(0, len(str(step)) - 2) == 0


def append_tip_token_sample(
    output_dir: str | Path,
    *,
    step: int,
    rule: str,
    entropy_BT: torch.Tensor,
    divergence_BT: torch.Tensor | None,
    mask_BT: torch.Tensor,
    keep_BT: torch.Tensor,
    vocab_size: int,
    entropy_quantile: float,
    divergence_quantile: float,
    seed: int,
) -> Path | None:
    """Append this step's token sample to `output_dir/opd_tip_tokens.jsonl`.

    Args:
        step: the training step the batch trains (the step its metrics are logged at).
        rule: the TIP rule (`tip_rule`), recorded for the plot's title.
        entropy_BT: float [B, T] student entropy in nats.
        divergence_BT: float [B, T] student-teacher JSD in nats, or None when not computed.
        mask_BT: [B, T] 1 on valid completion tokens.
        keep_BT: bool [B, T] the tokens the rule kept.
        vocab_size: V of `h = H / ln V`.
        entropy_quantile, divergence_quantile: q_h and q_j of the q3 thresholds.
        seed: with the step, seeds the subsample.

    Returns:
        The file's path, or None when the step is not sampled or has no valid token.
    """
    valid_N = mask_BT.detach().bool().flatten().cpu()
    num_valid = int(valid_N.sum())
    if not is_sampled_step(step) or num_valid == 0:
        return None
    entropy_N = entropy_BT.detach().flatten().cpu()[valid_N]
    divergence_N = None if divergence_BT is None else divergence_BT.detach().flatten().cpu()
    h_N, j_N = tip_axes(
        entropy_N,
        torch.zeros_like(entropy_N) if divergence_N is None else divergence_N[valid_N],
        vocab_size=vocab_size,
    )
    kept_N = keep_BT.detach().bool().flatten().cpu()[valid_N]
    generator = torch.Generator(device="cpu").manual_seed(seed + step)
    pick_M = torch.randperm(num_valid, generator=generator)[:MAX_TOKENS].sort().values
    record = {
        "step": step,
        "rule": rule,
        "h": _rounded(h_N[pick_M]),
        "j": None if divergence_N is None else _rounded(j_N[pick_M]),
        "kept": kept_N[pick_M].int().tolist(),
        "h_threshold": round(float(batch_quantile(h_N, entropy_quantile)), 5),
        "j_threshold": None
        if divergence_N is None
        else round(float(batch_quantile(j_N, divergence_quantile)), 5),
        "entropy_quantile": entropy_quantile,
        "divergence_quantile": divergence_quantile,
        "num_valid": num_valid,
    }
    path = Path(output_dir) / TIP_TOKENS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if step == 1 else "a") as file:  # step 1: a fresh run, a fresh file
        file.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def _rounded(values_M: torch.Tensor) -> list[float]:
    """3 decimals: a scatter point needs no more, and it keeps each line near 3 KB."""
    return [round(value, 3) for value in values_M.tolist()]
