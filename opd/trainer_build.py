"""What `OPDTrainer.__init__` builds besides TRL's parts: the teacher, the G-OPD reference, and
the checks that a method's needs match the teacher and loss settings (STYLE: `__init__` stores,
named `build_*` functions build).

Test: `pytest tests/integration/test_methods.py`.
"""

from __future__ import annotations

from trl.trainer.utils import add_fused_lm_head

from opd.config import ConfigError, OPDConfig
from opd.teacher.local import LocalTeacher, detached_copy
from opd.teacher.protocol import TeacherScorer

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


def check_trainer_args(args, reward_funcs) -> None:
    if not isinstance(args, OPDConfig):
        raise TypeError("OPDTrainer needs an OPDConfig (it adds the teacher_* and opd_* fields).")
    if reward_funcs is None and args.opd_outcome_weight > 0:
        raise ConfigError(
            "opd_outcome_weight > 0 needs reward functions for the outcome rewards: pass "
            "reward_funcs (CLI: --reward_funcs NAME ...) or set opd_outcome_weight to 0."
        )


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
    """OPSD's teacher: a frozen copy of the student's initial weights (before any update)."""
    return LocalTeacher.frozen_copy_of(
        model, temperature=args.teacher_temperature, batch_size=args.teacher_batch_size
    )


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


def needs_teacher_hidden(args: OPDConfig) -> bool:
    """Whether the teacher's full distribution (hidden states + lm_head) is needed."""
    without_topk = args.teacher_top_k == 0
    return (
        args.opd_baseline == "full"
        or (args.opd_divergence != "none" and args.opd_divergence_support == "full")
        or (without_topk and (tip_needs_jsd(args) or args.opd_baseline == "topk"))
    )


def tip_needs_jsd(args: OPDConfig) -> bool:
    """TIP ranks by divergence in q3/type_aware, and in entropy_sample when gamma > 0."""
    return args.tip_rule in ("q3", "type_aware") or (
        args.tip_rule == "entropy_sample" and args.tip_gamma != 0
    )


def check_method_capabilities(args: OPDConfig, teacher: TeacherScorer | None, reward_funcs) -> None:
    """Fail before training when a method asks for something its teacher or loss cannot give."""
    in_process = teacher is None or isinstance(teacher, LocalTeacher)  # None: 'self', built later
    if needs_teacher_hidden(args) and not in_process:
        raise ConfigError(
            "the full-vocabulary teacher distribution (opd_baseline: full, "
            "opd_divergence_support: full, or TIP's divergence without teacher_top_k) needs an "
            f"in-process teacher (teacher_mode local or self), not {args.teacher_mode!r}; use the "
            "top-k form (opd_baseline: topk / opd_divergence_support: topk) with teacher_top_k > 0."
        )
    remote_topk_needed = args.opd_baseline == "topk" or (
        args.opd_divergence != "none" and args.opd_divergence_support == "topk"
    )
    if remote_topk_needed and args.teacher_top_k == 0 and not in_process:
        raise ConfigError("this method uses the teacher's top-k: set teacher_top_k (e.g. 20).")
    if (
        args.opd_divergence != "none"
        and args.opd_divergence_support == "topk"
        and not args.teacher_top_k
    ):
        raise ConfigError(
            "opd_divergence_support: topk needs the teacher's top-k: set teacher_top_k (e.g. 20)."
        )
    if args.opd_weighting in ("scope", "uni_opd") and reward_funcs is None:
        raise ConfigError(
            f"opd_weighting={args.opd_weighting!r} routes by correctness: pass reward_funcs "
            "(CLI: --reward_funcs math_accuracy); the first one decides correctness."
        )
    _check_loss_options(args)


def _check_loss_options(args: OPDConfig) -> None:
    """opd computes the loss itself (chosen positions, fused lm_head); refuse TRL loss options
    it does not implement instead of silently ignoring them."""
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ConfigError(
            f"loss_type={args.loss_type!r} is not supported by opd's loss; use one of "
            f"{', '.join(SUPPORTED_LOSS_TYPES)} (the ratio form is opd_ratio)."
        )
    if args.importance_sampling_level != "token":
        raise ConfigError("importance_sampling_level must be 'token' with opd's loss.")
    if args.top_entropy_quantile < 1.0:
        raise ConfigError(
            "top_entropy_quantile is TRL's entropy mask; in opd use tip_rule: entropy_sample or "
            "type_aware (TIP), which also drops the masked tokens' logits."
        )
    if args.use_liger_kernel:
        raise ConfigError(
            "use_liger_kernel replaces the loss that opd computes (its fused kernels already "
            "avoid full logits); set use_liger_kernel: false."
        )
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        raise ConfigError("off_policy_mask_threshold is not supported by opd's loss.")
