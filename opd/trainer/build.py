"""What `OPDTrainer.__init__` builds besides TRL's parts: the teacher, the G-OPD reference, and
the checks that a method's needs match the teacher and loss settings (STYLE: `__init__` stores,
named `build_*` functions build).

Test: `pytest tests/unit/test_loss_fields.py tests/integration/test_methods.py`.
"""

from __future__ import annotations

import dataclasses
import warnings

from trl import GRPOConfig

from opd.arguments import ConfigError
from opd.config import CANDIDATE_SCORING_GAPS, OPDConfig, candidate_scoring_refusal
from opd.objectives.candidates import CandidatePlan
from opd.objectives.offpolicy import RatioSettings
from opd.teacher.local import LocalTeacher, detached_copy
from opd.teacher.protocol import CandidateScorer, FullDistributionTeacher, TeacherScorer
from opd.trainer.trl_seams import add_fused_lm_head, router_aux_loss_enabled
from opd.types import (
    Baseline,
    DivergenceSupport,
    Ratio,
    TeacherMode,
)

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")

# Every `GRPOConfig` field that TRL's `GRPOTrainer._compute_loss` reads (directly or through the
# trainer attribute `__init__` copies it to) is classified here, because opd computes the loss
# itself (`opd/trainer/loss.py`). `tests/unit/test_loss_fields.py` derives that set from TRL's
# source, so a new TRL loss option fails a test until it is classified.
# Supported: opd implements it equivalently (value: where).
SUPPORTED_LOSS_FIELDS: dict[str, str] = {
    "loss_type": "normalisation in objectives/surrogate.py reduce_loss (others refused below)",
    "epsilon": "PPO clip with opd_ratio: ppo (objectives/surrogate.py policy_loss_N)",
    "epsilon_high": "PPO clip with opd_ratio: ppo; the CISPO cap with opd_ratio: cispo",
    "delta": "two-sided clip with opd_ratio: ppo (policy_loss_N); refused with other ratios",
    "beta": "k3 KL to the reference (surrogate.py reference_kl_N, trainer/loss.py)",
    "use_bias_correction_kl": "that KL times the ratio (reference_kl_N's old_logprobs_N)",
    "max_completion_length": "dr_grpo's normaliser (reduce_loss)",
    "steps_per_generation": "dapo/cispo's per-micro-batch token normaliser (trainer/loss.py)",
    "use_vllm": "the importance ratio below applies only with vLLM, as in TRL",
    "temperature": "logits / temperature in the fused lm_head (trainer/loss.py), as TRL's",
    "vllm_importance_sampling_correction": "loss times TRL's importance_sampling_ratio "
    "(trainer/loss.py; TRL computes the ratio with its vllm_importance_sampling_* fields)",
}
_ENTROPY_BONUS_FIELDS = (
    "entropy_coef", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max",
    "entropy_coef_delta", "entropy_target",
)  # fmt: skip
_SAPO_VESPO_FIELDS = (
    "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos",
    "vespo_k_neg", "vespo_lambda_neg",
)  # fmt: skip
# Refused: `check_loss_options` raises this ConfigError when the field is not at its default.
REFUSED_LOSS_FIELDS: dict[str, str] = {
    "importance_sampling_level": "importance_sampling_level must be 'token' with opd's loss "
    "(the ratio is per token; opd_ratio picks its form).",
    "top_entropy_quantile": "top_entropy_quantile is TRL's entropy mask; in opd use tip_rule: "
    "entropy_sample or type_aware (TIP), which also drops the masked tokens' logits.",
    "off_policy_mask_threshold": "off_policy_mask_threshold (TRL's off-policy sequence mask) is "
    "not implemented by opd's loss; unset it (opd_behaviour_logprobs sets lp_old instead).",
    "router_aux_loss_coef": "the MoE router auxiliary loss is not implemented by opd's loss; "
    "set router_aux_loss_coef: 0 to train the MoE student without it.",
    **{
        name: f"{name} sets TRL's entropy bonus, which opd's loss does not implement; leave "
        "entropy_coef at 0 and use_adaptive_entropy false (opd_kl_coef shapes the advantage)."
        for name in _ENTROPY_BONUS_FIELDS
    },
    **{
        name: f"{name} only applies to TRL's loss_type '{name.split('_')[0]}'; leave it at its "
        "default (opd's SAPO: opd_ratio: sapo, its temperatures in opd_ratio_settings "
        "sapo_tau_pos / sapo_tau_neg)."
        for name in _SAPO_VESPO_FIELDS
    },
}
LOSS_FIELDS = SUPPORTED_LOSS_FIELDS.keys() | REFUSED_LOSS_FIELDS.keys()


def check_trainer_args(args, reward_funcs) -> None:
    if not isinstance(args, OPDConfig):
        raise TypeError("OPDTrainer needs an OPDConfig (it adds the teacher_* and opd_* fields).")
    if reward_funcs is None and args.opd_outcome_weight > 0:
        raise ConfigError(
            "opd_outcome_weight > 0 needs reward functions for the outcome rewards: pass "
            "reward_funcs (CLI: --reward_funcs NAME ...) or set opd_outcome_weight to 0."
        )
    readers = args.reads_correctness
    if reward_funcs is None and readers:
        raise ConfigError(
            f"{', '.join(readers)} read which rollouts are correct: pass reward_funcs (CLI: "
            "--reward_funcs NAME; the first one is the verifier) or unset them."
        )
    try:
        RatioSettings.from_mapping(args.opd_ratio_settings)
    except ValueError as error:
        raise ConfigError(f"opd_ratio_settings: {error}") from None


def load_student_tokenizer(model):
    """The tokenizer of `model` (a name/path or a loaded model), as a ConfigError when missing."""
    from transformers import AutoTokenizer

    name = model if isinstance(model, str) else model.config.name_or_path
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ConfigError(
            f"cannot load the student tokenizer from {name!r} ({error}); check model_name_or_path."
        ) from error


def build_offline_rollouts(args: OPDConfig, teacher, train_dataset, trainer_kwargs: dict):
    """Lightning OPD: the stored rollouts become the prompts and TRL's `rollout_func`.

    Returns `(OfflineRollouts, prompt dataset)`; sets `use_vllm` off and adds the `rollout_func`
    to the keyword arguments for `GRPOTrainer`.
    """
    from opd.rollout.offline import OfflineRollouts

    if train_dataset is not None:
        raise ConfigError(
            "teacher_mode='offline' trains on the rollouts stored in teacher_shards: "
            "pass no train_dataset (write other prompts with `opd rollout` first)."
        )
    offline = OfflineRollouts(teacher, num_generations=args.num_generations)
    args.use_vllm = False
    trainer_kwargs["rollout_func"] = offline.rollout_func
    return offline, offline.prompt_dataset()


def build_self_teacher(model, args: OPDConfig) -> LocalTeacher:
    """OPSD's teacher: the student's initial weights (before any update). A frozen copy, or for
    a PEFT student its base model with the adapters disabled (the same weights, no copy)."""
    kwargs = {"temperature": args.teacher_temperature, "batch_size": args.teacher_batch_size}
    if hasattr(model, "disable_adapter"):
        return LocalTeacher.adapter_disabled_view_of(model, **kwargs)
    return LocalTeacher.frozen_copy_of(model, **kwargs)


def build_reference_model(args: OPDConfig, model, trl_reference=None):
    """lp_ref of G-OPD for `opd_lambda != 1`: a given model, else the initial student.

    Returns None when the reference is the PEFT student with its adapter disabled (no copy).
    """
    if args.opd_reference_model:
        from transformers import AutoModelForCausalLM

        try:
            reference = AutoModelForCausalLM.from_pretrained(
                args.opd_reference_model, dtype=next(model.parameters()).dtype
            )
        except OSError as error:
            raise ConfigError(
                f"cannot load opd_reference_model {args.opd_reference_model!r} ({error})."
            ) from error
        return reference.to(next(model.parameters()).device).eval().requires_grad_(False)
    if trl_reference is not None:  # TRL already holds the initial weights (beta > 0)
        return trl_reference
    if hasattr(model, "disable_adapter"):
        return None
    reference = detached_copy(model).eval().requires_grad_(False)
    # TRL's per-token logprob path calls `model(..., fused_lm_head=True)`: give the copy the
    # same fused head TRL gave the student (and its own reference model).
    add_fused_lm_head(
        reference, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32
    )
    return reference


def uses_teacher_hidden(args: OPDConfig, teacher: TeacherScorer) -> bool:
    """Whether phase 1 runs the teacher's hidden states: when the method needs its full
    distribution, and for the top-k baseline whenever the teacher can give it (exact values on
    the student's top-k instead of the tail-bucket estimate)."""
    return needs_full_distribution(args, teacher) or (
        args.opd_baseline == Baseline.TOPK and isinstance(teacher, FullDistributionTeacher)
    )


def needs_full_distribution(args: OPDConfig, teacher: TeacherScorer | None) -> bool:
    """`args.needs_full_teacher_distribution`, less the top-k baseline without teacher_top_k
    when the teacher scores the student's top-k ids itself (`CandidateScorer`)."""
    if isinstance(teacher, CandidateScorer):
        return args.needs_full_teacher_distribution_beyond_candidates
    return args.needs_full_teacher_distribution


def build_candidate_plan(args: OPDConfig, teacher: TeacherScorer) -> CandidatePlan | None:
    """What phase 1 asks the teacher to score at candidate ids (`opd/objectives/candidates.py`):
    the divergence's student/union support, and the top-k baseline's student top-k when the
    teacher scores candidates but is not in-process (an in-process teacher's hidden states give
    the baseline exactly without a request). None: no candidate request."""
    exact_baseline = (
        args.opd_baseline == Baseline.TOPK
        and isinstance(teacher, CandidateScorer)
        and not isinstance(teacher, FullDistributionTeacher)
        and _scores_candidates(teacher, args.opd_baseline_top_k, use="the top-k baseline")
    )
    divergence = args.uses_candidate_divergence
    if not (divergence or exact_baseline):
        return None
    return CandidatePlan(
        divergence_support=args.opd_divergence_support if divergence else None,
        divergence_k=args.teacher_top_k if divergence else 0,
        baseline_k=args.opd_baseline_top_k if exact_baseline else 0,
    )


def candidate_width(args: OPDConfig) -> int:
    """Candidate ids per position the run asks for (`CandidatePlan`: the student's top M, plus
    the teacher's top-k for the union support)."""
    widths = [args.opd_baseline_top_k] if args.opd_baseline == Baseline.TOPK else []
    if args.uses_candidate_divergence:
        widths.append(args.teacher_top_k)
    union = args.opd_divergence_support == DivergenceSupport.UNION
    return max(widths, default=0) + (args.teacher_top_k if union else 0)


def _candidate_capacity(teacher, width: int) -> int:
    """Candidate ids per position the teacher scores: a served one's /info says; an in-process
    one scores any number (`width` stands for that)."""
    return teacher.max_candidates() if hasattr(teacher, "max_candidates") else width


def _scores_candidates(teacher, width: int, *, use: str) -> bool:
    """Whether the teacher scores `width` candidate ids per position. Warns, once at start-up,
    when it does not."""
    capacity = _candidate_capacity(teacher, width)
    if capacity < width:
        warnings.warn(
            f"opd: the teacher server scores at most {capacity} candidate ids per position, "
            f"{use} asks for {width}: it uses the teacher's own top-k with a uniform share of "
            "its tail for the other ids (an estimate). Exact values: `opd teacher serve "
            f"--backend transformers --max_candidates {width}`.",
            stacklevel=2,
        )
    return capacity >= width


def check_method_capabilities(args: OPDConfig, teacher: TeacherScorer | None, reward_funcs) -> None:
    """Fail before training when a method asks for something its teacher or loss cannot give."""
    # None: teacher_mode 'self', built later as an in-process copy of the student
    in_process = teacher is None or isinstance(teacher, FullDistributionTeacher)
    if in_process and _zero3_enabled() and _partitioned_teacher(args, teacher):
        raise ConfigError(
            f"teacher_mode={args.teacher_mode!r} runs the teacher in this process, but DeepSpeed "
            "ZeRO-3 partitions the weights it would run on; serve the teacher instead "
            "(`opd teacher serve`, teacher_mode: server) or shard the student with FSDP2."
        )
    if needs_full_distribution(args, teacher) and not in_process:
        if args.teacher_mode == TeacherMode.OFFLINE:
            from opd.teacher.offline import missing_hidden_states

            raise ConfigError(missing_hidden_states(args.teacher_shards))
        raise ConfigError(
            "the full-vocabulary teacher distribution (opd_baseline: full, "
            "opd_divergence_support: full, or TIP's divergence without teacher_top_k) needs an "
            "in-process teacher (teacher_mode local or self) or teacher_mode server with a server "
            "that returns hidden states (opd teacher serve --backend transformers), not "
            f"{args.teacher_mode!r}; or use the top-k form (opd_baseline: topk / "
            "opd_divergence_support: topk) with teacher_top_k > 0."
        )
    _check_candidate_scoring(args, teacher)
    # An in-process teacher, or a candidate scorer for the top-k baseline, needs no top-k.
    scores_baseline = isinstance(teacher, CandidateScorer) and not args.uses_topk_divergence
    if args.needs_teacher_topk and args.teacher_top_k == 0 and not (in_process or scores_baseline):
        raise ConfigError("this method uses the teacher's top-k: set teacher_top_k (e.g. 20).")
    if args.uses_topk_divergence and not args.teacher_top_k:
        raise ConfigError(
            f"opd_divergence_support: {args.opd_divergence_support} needs teacher_top_k, the "
            "size of its top-k support: set teacher_top_k (e.g. 20)."
        )
    if args.needs_correctness and reward_funcs is None:
        raise ConfigError(
            f"opd_weighting={args.opd_weighting!r} routes by correctness: pass reward_funcs "
            "(CLI: --reward_funcs math_accuracy); the first one decides correctness."
        )
    check_loss_options(args)


def _check_candidate_scoring(args: OPDConfig, teacher: TeacherScorer | None) -> None:
    """The student/union divergence support needs a teacher that scores candidate ids, or its
    hidden states (offline shards that store them); say why a stock vLLM server or top-k-only
    shards cannot, and what to run instead."""
    # None: teacher_mode 'self', an in-process LocalTeacher (a CandidateScorer), built later
    if not args.uses_candidate_divergence or teacher is None:
        return
    if isinstance(teacher, FullDistributionTeacher):
        return
    if isinstance(teacher, CandidateScorer):
        width = candidate_width(args)
        capacity = _candidate_capacity(teacher, width)
        if capacity < width:
            why = (
                f"the teacher server scores at most {capacity} candidate ids per position and "
                f"this run asks for {width} (raise its --max_candidates, or lower teacher_top_k "
                "and opd_baseline_top_k)"
            )
            raise ConfigError(candidate_scoring_refusal(args.opd_divergence_support, why))
        return
    why = CANDIDATE_SCORING_GAPS.get(args.teacher_mode) if not args.teacher_routes else None
    why = why or f"this teacher ({type(teacher).__name__}) cannot score ids it did not choose"
    raise ConfigError(candidate_scoring_refusal(args.opd_divergence_support, why))


def check_loss_options(args: OPDConfig) -> None:
    """opd computes the loss itself (chosen positions, fused lm_head); refuse TRL loss options
    it does not implement instead of silently ignoring them (see REFUSED_LOSS_FIELDS)."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ConfigError(
            f"loss_type={args.loss_type!r} is not supported by opd's loss; use one of "
            f"{', '.join(SUPPORTED_LOSS_TYPES)} (the ratio form is opd_ratio)."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name, message in REFUSED_LOSS_FIELDS.items():
        value = getattr(args, name)
        allowed = (defaults[name], 0.0) if name == "router_aux_loss_coef" else (defaults[name],)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}: {message}")
    if args.delta is not None and args.opd_ratio != Ratio.PPO:
        raise ConfigError(
            f"delta={args.delta} is TRL's two-sided clip of the PPO ratio; set opd_ratio: ppo, "
            f"or unset delta (opd_ratio {args.opd_ratio!r} has no clip it applies to)."
        )
    if args.use_liger_kernel:
        raise ConfigError(
            "use_liger_kernel replaces the loss that opd computes (its fused kernels already "
            "avoid full logits); set use_liger_kernel: false."
        )


def check_trainer_loss_state(trainer) -> None:
    """After `GRPOTrainer.__init__`: refuse what TRL enabled from the model, not the config (an
    MoE student's own router_aux_loss_coef turns TRL's auxiliary loss on by default)."""
    if router_aux_loss_enabled(trainer):
        raise ConfigError(
            f"{type(trainer.model).__name__} is a Mixture-of-Experts model and TRL would add its "
            f"router auxiliary loss: {REFUSED_LOSS_FIELDS['router_aux_loss_coef']}"
        )


def _partitioned_teacher(args: OPDConfig, teacher) -> bool:
    """The self-teacher copies the (partitioned) student; a local teacher loaded while ZeRO-3
    was configured is partitioned too (`ds_id` on its parameters, the lm_head weight among
    them). One loaded before is whole."""
    if teacher is None or args.teacher_mode == TeacherMode.SELF:
        return True
    return hasattr(teacher.output_weight, "ds_id")


def _zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()
