"""The data contract between opd's stages: rollout -> teacher -> objective -> trainer.

Stages pass these frozen dataclasses to each other, never loose dicts of tensors. Shapes and dtypes
are checked on construction because data enters here over HTTP, from disk and from vLLM.

Shape suffixes: `_B` batch (one row per completion), `_T` completion tokens, `_K` top-k.

Test: `pytest tests/unit/test_types.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Scores are log_softmax(logits / temperature) in float32. Once |logit| / temperature passes
# float32's max (3.4e38) the division gives inf and inf - inf is NaN: the tiny test teacher
# (|logits| < 2) returned NaN for every token at temperature 1e-40 and finite scores at 1e-38. At
# 0.01 an overflow needs |logit| > 3.4e36, which no model produces, and lower temperatures add
# nothing but that risk: at 0.01 a logit gap of 1.04 is already a probability below float32's
# smallest (exp(-104)), so the distribution is one-hot for any real logits. There is no ceiling:
# a huge temperature gives the finite uniform distribution (checked up to 1.7e308).
MIN_TEMPERATURE = 0.01


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_2d(name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> None:
    _check(
        tuple(tensor.shape) == shape,
        f"{name} has shape {tuple(tensor.shape)}, expected {shape} (batch, completion tokens)",
    )


@dataclass(frozen=True)
class RolloutBatch:
    """Completions sampled by the student, as token ids (one row per completion)."""

    prompt_ids: list[list[int]]
    """Student prompt token ids, ragged: one list per completion (repeated within a group)."""
    completion_ids_BT: torch.Tensor
    """int64 [B, T] sampled completion ids, right-padded (padding value is irrelevant)."""
    completion_mask_BT: torch.Tensor
    """[B, T] 1 on generated tokens, 0 on padding (and on environment tokens in multi-turn data)."""
    sampler_logprobs_BT: torch.Tensor | None = None
    """float32 [B, T] the sampler's logprob of each sampled token (lp_old, importance ratios)."""
    stop_reason_B: list[str] | None = None
    """Why each completion ended: "stop" (EOS) or "length" (truncated)."""
    policy_version: int = 0
    """The trainer step whose weights produced the batch."""
    teacher_prompt_ids: list[list[int]] | None = None
    """The context the teacher sees before the same completion ids (privileged context, OPSD).
    None means the teacher sees `prompt_ids`."""
    teacher_route_B: list[str] | None = None
    """Which teacher scores each row (multi-teacher routing); None: the only teacher."""

    def __post_init__(self):
        _check(
            self.completion_ids_BT.ndim == 2,
            f"completion_ids_BT must be [B, T], got shape {tuple(self.completion_ids_BT.shape)}",
        )
        num_rows, num_tokens = self.completion_ids_BT.shape
        _check(
            self.completion_ids_BT.dtype in (torch.int32, torch.int64),
            f"completion_ids_BT must be int32/int64, got {self.completion_ids_BT.dtype}",
        )
        _check(
            len(self.prompt_ids) == num_rows,
            f"{len(self.prompt_ids)} prompts for {num_rows} completions",
        )
        _check_2d("completion_mask_BT", self.completion_mask_BT, (num_rows, num_tokens))
        if self.sampler_logprobs_BT is not None:
            _check_2d("sampler_logprobs_BT", self.sampler_logprobs_BT, (num_rows, num_tokens))
            _check(
                self.sampler_logprobs_BT.is_floating_point(),
                f"sampler_logprobs_BT must be floating point, got {self.sampler_logprobs_BT.dtype}",
            )
        if self.stop_reason_B is not None:
            _check(len(self.stop_reason_B) == num_rows, "stop_reason_B needs one entry per row")
        if self.teacher_prompt_ids is not None:
            _check(
                len(self.teacher_prompt_ids) == num_rows,
                f"{len(self.teacher_prompt_ids)} teacher prompts for {num_rows} completions",
            )
        if self.teacher_route_B is not None:
            _check(len(self.teacher_route_B) == num_rows, "teacher_route_B needs one entry per row")

    @property
    def teacher_context_ids(self) -> list[list[int]]:
        """What the teacher scores the completion after: its own prompt, else the student's."""
        return self.teacher_prompt_ids if self.teacher_prompt_ids is not None else self.prompt_ids

    def completion_lengths_B(self) -> list[int]:
        return self.completion_mask_BT.sum(dim=1).tolist()


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's judgement of each sampled completion token."""

    sampled_logprobs_BT: torch.Tensor
    """float32 [B, T] log p_teacher(y_t | teacher context, y_<t); 0 where the mask is 0."""
    completion_mask_BT: torch.Tensor
    """[B, T] the mask the scores are valid under (same as the rollout's)."""
    topk_ids_BTK: torch.Tensor | None = None
    """int32/int64 [B, T, K] the teacher's top-k token ids at each position (optional)."""
    topk_logprobs_BTK: torch.Tensor | None = None
    """float32 [B, T, K] their logprobs, sorted descending, padded with -inf."""
    teacher_id: str = ""
    """Who scored: model name or path (recorded in logs and shard manifests)."""
    temperature: float = 1.0
    """The temperature the teacher logits were divided by before the log-softmax."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scoring statistics, e.g. `teacher/latency_s`."""

    def __post_init__(self):
        _check(self.sampled_logprobs_BT.ndim == 2, "sampled_logprobs_BT must be [B, T]")
        _check(
            self.sampled_logprobs_BT.dtype == torch.float32,
            f"sampled_logprobs_BT must be float32, got {self.sampled_logprobs_BT.dtype}",
        )
        shape_BT = tuple(self.sampled_logprobs_BT.shape)
        _check_2d("completion_mask_BT", self.completion_mask_BT, shape_BT)
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(
            (self.topk_ids_BTK is None) == (self.topk_logprobs_BTK is None),
            "topk_ids_BTK and topk_logprobs_BTK come together",
        )
        if self.topk_ids_BTK is None:
            return
        _check(
            self.topk_ids_BTK.ndim == 3 and tuple(self.topk_ids_BTK.shape[:2]) == shape_BT,
            f"topk_ids_BTK has shape {tuple(self.topk_ids_BTK.shape)}, expected {shape_BT} + (K,)",
        )
        _check(
            self.topk_logprobs_BTK.shape == self.topk_ids_BTK.shape,
            "topk_logprobs_BTK must have the shape of topk_ids_BTK",
        )
        _check(
            self.topk_ids_BTK.dtype in (torch.int32, torch.int64),
            f"topk_ids_BTK must be int32/int64, got {self.topk_ids_BTK.dtype}",
        )
        _check(
            self.topk_logprobs_BTK.dtype == torch.float32,
            f"topk_logprobs_BTK must be float32, got {self.topk_logprobs_BTK.dtype}",
        )

    @property
    def top_k(self) -> int:
        return 0 if self.topk_ids_BTK is None else self.topk_ids_BTK.shape[-1]


@dataclass(frozen=True)
class LossOutput:
    """What an objective returns to the trainer."""

    loss: torch.Tensor
    """Scalar with grad."""
    per_token_BT: torch.Tensor
    """Detached [B, T] per-token loss or advantage, for logging."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Namespaced metrics, e.g. `kl/reverse`, `tokens/valid`."""
