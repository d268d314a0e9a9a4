"""The data contract between opd's stages: rollout -> teacher -> objective -> trainer.

Stages pass these frozen dataclasses to each other, never loose dicts of tensors. Shapes and dtypes
are checked on construction because data enters here over HTTP, from disk and from vLLM.
`TokenStats` (objective -> trainer) and `OPDBatchFields` (the trainer's phase 1 -> its loss,
through TRL's batch dict) are made inside the library, so their shapes are asserted.

The choices of `OPDConfig` (teacher modes, baselines, divergences, ...) are `StrEnum`s defined
here, once: the config's field types and validation, and the objectives that branch on them, all
import them from this module (the objectives must not import the config, which imports TRL).

Shape suffixes: `_B` batch (one row per completion), `_T` completion tokens, `_K` top-k, `_N`
flattened positions.

Test: `pytest tests/unit/test_types.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

import torch

# Scores are log_softmax(logits / temperature) in float32. Once |logit| / temperature passes
# float32's max (3.4e38) the division gives inf and inf - inf is NaN: the tiny test teacher
# (|logits| < 2) returned NaN for every token at temperature 1e-40 and finite scores at 1e-38. At
# 0.01 an overflow needs |logit| > 3.4e36, which no model produces, and lower temperatures add
# nothing but that risk: at 0.01 a logit gap of 1.04 is already a probability below float32's
# smallest (exp(-104)), so the distribution is one-hot for any real logits. There is no ceiling:
# a huge temperature gives the finite uniform distribution (checked up to 1.7e308).
MIN_TEMPERATURE = 0.01


class Choice(StrEnum):
    """A config choice: members are the strings YAML and the command line use, and compare equal
    to them. The repr is the plain string's, so messages read `teacher_mode='server'` as before."""

    def __repr__(self) -> str:
        return repr(self.value)


class TeacherMode(Choice):
    """Where the teacher runs (`teacher_mode`)."""

    LOCAL = "local"
    SERVER = "server"
    VLLM = "vllm"
    OFFLINE = "offline"
    SELF = "self"


# The modes whose teacher is named directly, by a model (local) or a URL (server, vllm): what
# teacher routes and `opd teacher precompute` can use (offline reads shards; self is the student).
DIRECT_TEACHER_MODES = (TeacherMode.LOCAL, TeacherMode.SERVER, TeacherMode.VLLM)


class TeacherDtype(Choice):
    """dtype of an in-process teacher (`teacher_dtype`); AUTO follows the student's precision."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class HiddenDtype(Choice):
    """dtype of a teacher's hidden states on the wire and in shards (`teacher_hidden_dtype`)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class BehaviourLogprobs(Choice):
    """Where lp_old comes from (`opd_behaviour_logprobs`)."""

    SAMPLER = "sampler"
    TRAINER = "trainer"


class Baseline(Choice):
    """vOPD's control-variate baseline V_t = -KL_t (`opd_baseline`)."""

    NONE = "none"
    FULL = "full"
    TOPK = "topk"
    MIN_VARIANCE = "min_variance"
    """VCPO's off-policy baseline: the w^2-weighted mean of the OPD reward over each group, w the
    importance weights of the current policy against the sampler (`opd/objectives/vcpo.py`)."""


class Ratio(Choice):
    """Importance ratio form of the surrogate (`opd_ratio`). PLAIN, PPO and CISPO act on flattened
    tokens (`objectives/surrogate.py`); the off-policy forms of METHODS.md s.10 (TOPR, DISPO,
    MINPRO, CTPO, SAPO, BAPO) need each row's prefix (`objectives/offpolicy.py`)."""

    PLAIN = "plain"
    PPO = "ppo"
    CISPO = "cispo"
    TOPR = "topr"
    DISPO = "dispo"
    MINPRO = "minpro"
    CTPO = "ctpo"
    SAPO = "sapo"
    BAPO = "bapo"


class Divergence(Choice):
    """The supervised divergence term of family B (`opd_divergence`)."""

    NONE = "none"
    REVERSE_KL = "reverse_kl"
    FORWARD_KL = "forward_kl"
    JSD = "jsd"


class DivergenceSupport(Choice):
    """Where the divergence term is computed (`opd_divergence_support`): a set of ids plus a tail
    bucket (TOPK, STUDENT, UNION), or the whole vocabulary (FULL)."""

    TOPK = "topk"
    """The teacher's top-k ids, with the logprobs the teacher returned for them."""
    FULL = "full"
    """The full vocabulary (an in-process teacher's hidden states)."""
    STUDENT = "student"
    """The student's top-k ids (K = teacher_top_k), scored exactly by the teacher."""
    UNION = "union"
    """The student's and the teacher's top-k ids, deduplicated, scored exactly by the teacher."""

    @property
    def scores_candidates(self) -> bool:
        """The support holds ids the teacher did not choose, so it must score them on request."""
        return self in (DivergenceSupport.STUDENT, DivergenceSupport.UNION)


class TipRule(Choice):
    """TIP token selection (`tip_rule`, `opd/objectives/tip.py`)."""

    NONE = "none"
    ENTROPY_SAMPLE = "entropy_sample"
    Q3 = "q3"
    TYPE_AWARE = "type_aware"


class Weighting(Choice):
    """Per-sample weighting of the OPD term (`opd_weighting`)."""

    NONE = "none"
    SCOPE = "scope"
    SOD = "sod"
    UNI_OPD = "uni_opd"


class TraceGate(Choice):
    """Which groups receive the LUFFY trace (`opd_trace_gate`, `opd/rollout/trace_gate.py`)."""

    ALWAYS = "always"
    ALL_FAIL = "all_fail"
    """Only groups whose on-policy rollouts all failed."""
    THOMPSON = "thompson"
    """HAPO: groups whose prompt's Thompson-sampled success rate is below a threshold."""


class ImitationGate(Choice):
    """Which prompts the imitation term covers (`opd_imitation_gate`: CHORD all, DYPO gated)."""

    ALWAYS = "always"
    ALL_FAIL = "all_fail"


class DepthUnit(Choice):
    """TCOD's curriculum unit (`tcod_unit`): off, the first D tokens, or the first D steps."""

    NONE = "none"
    TOKENS = "tokens"
    STEPS = "steps"


class PeerContext(Choice):
    """MOPD (`mopd_peers`, METHODS.md s.11): what of its group a rollout's teacher context holds."""

    NONE = "none"
    SUCCESSES = "successes"
    """Verified successes of the other rollouts as positive patterns."""
    CONTRASTIVE = "contrastive"
    """Successes and failures (negative examples), each labelled."""


class PrefixPlacement(Choice):
    """Where a guiding prefix lives (`opd_prefix_placement`, `opd/rollout/prefix.py`)."""

    PROMPT = "prompt"
    """POPE, PrefixRL: conditioning only, never trained."""
    COMPLETION = "completion"
    """Prefix-RFT: off-policy tokens at the head of the completion, trained by opd_prefix_loss."""


class PrefixGate(Choice):
    """Which prompts get guided rollouts (`opd_prefix_gate`)."""

    ALWAYS = "always"
    FAILED = "failed"
    """POPE: prompts the policy has rolled out and never solved (per-prompt ledger)."""


class PrefixShape(Choice):
    """The shape of the prefix-fraction schedule (`opd_prefix_schedule`)."""

    LINEAR = "linear"
    COSINE = "cosine"
    """A half cosine from start to end (Prefix-RFT's decay)."""


class PrefixLoss(Choice):
    """How completion-placed prefix tokens are trained (`opd_prefix_loss`)."""

    NLL = "nll"
    SHAPED = "shaped"
    """LUFFY's shaped ratio p / (p + opd_trace_gamma) times the token's advantage."""


class TokenSource(IntEnum):
    """Where each completion token came from (`OPDBatchFields.source_BT`)."""

    ON_POLICY = 0
    PREFIX = 1
    """A guiding prefix placed in the completion (Prefix-RFT)."""
    TRACE = 2
    """An off-policy trace row (LUFFY, StableOPD)."""


class SpanRule(Choice):
    """Where a cross-tokenizer span's advantage goes among its student tokens
    (`teacher_span_rule`, `opd/objectives/cross_vocab.py`)."""

    ALL = "all"  # the span's whole reward on each of its student tokens (REINFORCE on the span)
    SPREAD = "spread"  # an equal share on each student token of the span
    LAST = "last"  # all of it on the span's last student token, 0 on the others


class CrossVocab(Choice):
    """How the family-B divergence compares a teacher of another vocabulary (`opd_cross_vocab`)."""

    GOLD = "gold"  # the teacher's top-k ids whose strings are student tokens, plus a tail bucket
    ULD = "uld"  # the L1 distance of sorted probabilities over the ids no string match pairs
    HYBRID = "hybrid"  # both


class GuardAction(Choice):
    """What a collapse guard does when it fires (`guard_action`, `opd/guards.py`)."""

    WARN = "warn"
    STOP = "stop"


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
    span_start_BT: torch.Tensor | None = None
    """bool [B, T], set by a teacher of another tokenizer (`opd/teacher/cross_tokenizer.py`):
    True at the first student token of each aligned span. Then `sampled_logprobs_BT` holds each
    span's summed teacher logprob at the span's LAST student token (0 on its others), and the
    top-k, at the span's first student token, are the teacher's own vocabulary ids (-inf on the
    span's other tokens). The trainer maps both into the student's terms."""

    def __post_init__(self):
        _check(self.sampled_logprobs_BT.ndim == 2, "sampled_logprobs_BT must be [B, T]")
        _check(
            self.sampled_logprobs_BT.dtype == torch.float32,
            f"sampled_logprobs_BT must be float32, got {self.sampled_logprobs_BT.dtype}",
        )
        shape_BT = tuple(self.sampled_logprobs_BT.shape)
        _check_2d("completion_mask_BT", self.completion_mask_BT, shape_BT)
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        if self.span_start_BT is not None:
            _check_2d("span_start_BT", self.span_start_BT, shape_BT)
            _check(self.span_start_BT.dtype == torch.bool, "span_start_BT must be bool")
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


@dataclass(frozen=True)
class TokenStats:
    """Per-token student statistics over the vocabulary (no gradient), from
    `opd.objectives.token_stats.completion_token_stats`.

    Every tensor is float32 with one shape: `[N]` (the scored positions, flattened) or `[B, T]`
    (`scattered_BT`: 0 where no position was scored). A field is None when its inputs were not
    given.
    """

    logprob: torch.Tensor
    """log p_s(y_t): the student's logprob of each sampled token."""
    entropy: torch.Tensor
    """H_t = -sum_v p_s log p_s, in nats."""
    reverse_kl: torch.Tensor | None = None
    """KL(p_s || p_t): exact with the teacher's hidden states, else on the teacher's top-k plus a
    tail bucket; None without either."""
    topk_mass: torch.Tensor | None = None
    """The student's probability mass on the teacher's top-k ids; None without a top-k."""
    baseline_kl: torch.Tensor | None = None
    """KL_t of the vOPD baseline V_t = -KL_t (full or on the student's top-k); None without one."""
    jsd: torch.Tensor | None = None
    """JSD_0.5(p_s, p_t) in nats, TIP's divergence axis; None unless asked for."""

    def __post_init__(self):
        for name, values in self._present().items():
            assert values.shape == self.logprob.shape, f"TokenStats.{name} differs in shape"

    def _present(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def cat(cls, chunks_N: list[TokenStats]) -> TokenStats:
        """The `[N]` stats of consecutive chunks of positions as one `[N]` TokenStats."""
        names = chunks_N[0]._present()
        return cls(**{name: torch.cat([getattr(c, name) for c in chunks_N]) for name in names})

    def scattered_BT(self, mask_BT: torch.Tensor) -> TokenStats:
        """`[N]` stats of the True positions of `mask_BT` (row-major order) as `[B, T]` stats on
        the mask's device, 0 elsewhere."""
        keep_BT = mask_BT.bool()
        assert int(keep_BT.sum()) == self.logprob.shape[0], "one value per True position"

        def scatter(values_N: torch.Tensor) -> torch.Tensor:
            values_BT = torch.zeros(keep_BT.shape, dtype=torch.float32, device=keep_BT.device)
            values_BT[keep_BT] = values_N.to(values_BT)
            return values_BT

        return TokenStats(**{name: scatter(v) for name, v in self._present().items()})


# Each field's key in TRL's batch dict. TRL must not use these names itself
# (`tests/unit/test_trl_surface.py` checks its source); opd writes and reads them only here.
_BATCH_KEYS = {
    "keep_mask_BT": "opd_keep_mask",
    "offpolicy_B": "opd_offpolicy",
    "teacher_hidden_BTH": "opd_teacher_hidden",
    "teacher_topk_ids_BTK": "opd_teacher_topk_ids",
    "teacher_topk_logprobs_BTK": "opd_teacher_topk_logprobs",
    "behaviour_logprobs_BT": "opd_behaviour_logprobs",
    "correct_B": "opd_correct",
    "imitation_ids_BL": "opd_imitation_ids",
    "imitation_mask_BL": "opd_imitation_mask",
    "source_BT": "opd_token_source",
    "divergence_mask_BT": "opd_divergence_mask",
    "teacher_unmatched_logprobs_BTK": "opd_teacher_unmatched_logprobs",
}


@dataclass(frozen=True)
class OPDBatchFields:
    """What `OPDTrainer`'s loss phase needs besides TRL's own keys, for the rows of a batch.

    Phase 1 packs it into TRL's batch dict, which TRL shuffles and splits by rows into
    micro-batches, and the loss unpacks each micro-batch: the dict is the transport, this is its
    typed view, and `pack_into` / `unpack` are the only code that names the keys. Every value is
    a tensor with the rows first, so TRL slices it with the rest of the batch.
    """

    keep_mask_BT: torch.Tensor
    """bool [B, T] the positions the loss sees (TIP's selection; else the completion mask)."""
    offpolicy_B: torch.Tensor
    """bool [B] rows that are off-policy traces (LUFFY's shaped ratio, no vLLM correction)."""
    teacher_hidden_BTH: torch.Tensor | None = None
    """[B, T, H] the in-process teacher's final hidden states (the full-support divergence)."""
    teacher_topk_ids_BTK: torch.Tensor | None = None
    """int64 [B, T, K] the ids of the top-k divergence term's support: the teacher's top-k, or
    for `opd_divergence_support` student/union the candidate set the teacher scored (no id twice
    in a row; padding -1)."""
    teacher_topk_logprobs_BTK: torch.Tensor | None = None
    """float32 [B, T, K] the teacher's logprobs at those ids, padded with -inf."""
    behaviour_logprobs_BT: torch.Tensor | None = None
    """float32 [B, T] the sampler's logprob of each token (the off-policy ratio forms' lp_old;
    NaN where there is none: traces, or a token vLLM gave no logprob)."""
    correct_B: torch.Tensor | None = None
    """bool [B] the first reward function's verdict (DISPO/BAPO split by correctness)."""
    imitation_ids_BL: torch.Tensor | None = None
    """int64 [B, L] an expert trace after the row's prompt (CHORD's separate stream)."""
    imitation_mask_BL: torch.Tensor | None = None
    """float32 [B, L] 1 on the expert tokens the imitation term trains (0 on rows it skips)."""
    source_BT: torch.Tensor | None = None
    """int8 [B, T] each token's `TokenSource` (None: every token on-policy or of a trace row)."""
    divergence_mask_BT: torch.Tensor | None = None
    """float32 [B, T] per-token weight of the family-B divergence term (TRACE's forward-KL
    channel; MOPD rows without a context get 0). None: 1 on every kept token."""
    teacher_unmatched_logprobs_BTK: torch.Tensor | None = None
    """float32 [B, T, K] a teacher of another vocabulary: its top-k logprobs of the ids no
    student token string matches, sorted, -inf padded (the ULD term, `opd_cross_vocab`)."""

    def __post_init__(self):
        shape_BT = tuple(self.keep_mask_BT.shape)
        assert len(shape_BT) == 2, f"keep_mask_BT must be [B, T], got {shape_BT}"
        assert tuple(self.offpolicy_B.shape) == shape_BT[:1], "offpolicy_B must be [B]"
        for name in ("behaviour_logprobs_BT", "correct_B", "imitation_ids_BL", "imitation_mask_BL"):
            values = getattr(self, name)
            assert values is None or values.shape[0] == shape_BT[0], f"{name} is not [B, ...]"
        for name in ("source_BT", "divergence_mask_BT"):
            values = getattr(self, name)
            assert values is None or tuple(values.shape) == shape_BT, f"{name} is not [B, T]"
        for name in (
            "teacher_hidden_BTH",
            "teacher_topk_ids_BTK",
            "teacher_topk_logprobs_BTK",
            "teacher_unmatched_logprobs_BTK",
        ):
            values = getattr(self, name)
            assert values is None or tuple(values.shape[:2]) == shape_BT, f"{name} is not [B, T, .]"

    @staticmethod
    def batch_keys() -> tuple[str, ...]:
        """The keys opd adds to TRL's batch dict."""
        return tuple(_BATCH_KEYS.values())

    def pack_into(self, batch: dict[str, Any]) -> None:
        """Write the fields into TRL's batch dict (the fields that are None stay out)."""
        for name, key in _BATCH_KEYS.items():
            if getattr(self, name) is not None:
                batch[key] = getattr(self, name)

    @classmethod
    def unpack(cls, batch: dict[str, Any]) -> OPDBatchFields:
        """The fields of a batch dict (or TRL's micro-batch slice of it) that `pack_into` wrote."""
        return cls(**{name: batch[key] for name, key in _BATCH_KEYS.items() if key in batch})
