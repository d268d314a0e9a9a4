"""Train `OPDTrainer` for 2 steps on fixed rollouts, once per method; save the final weights.

Launched by `tests/integration/test_multiprocess.py`, alone or under `torchrun`:

    torchrun --nproc_per_node 2 tests/integration/mp_train.py --student S --teacher T \
        --out DIR --per_device_batch 2 [--accumulation 1] [--fsdp] [--methods vanilla,tip]

The rollouts are fixed (TRL's `rollout_func`): each completion is a function of its prompt and
its position in the group only, so 1 process x batch 2B, 2 processes x batch B, and 1 process x B
with 2 accumulation steps all see the same global generation batch. The optimizer is plain SGD:
Adam's update and a clipped gradient are invariant to the loss's scale, so a wrong
normalisation could hide behind either.
Each method's weights go to `DIR/<method>.pt` (rank 0, whole tensors, also under FSDP2).
"""

from __future__ import annotations

import argparse
import math
import os
import zlib
from functools import partial

os.environ.setdefault("OPD_KERNELS", "torch")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset

from opd import OPDConfig, OPDTrainer

GROUP = 4  # num_generations; with 2 processes x 2 rows, every group spans both processes
MAX_COMPLETION = 6
METHODS: dict[str, dict] = {
    "vanilla": {},  # loss_type dapo (TRL's default)
    "vanilla_grpo": {"loss_type": "grpo"},
    "vanilla_bnpo": {"loss_type": "bnpo"},
    "vanilla_dr_grpo": {"loss_type": "dr_grpo"},
    "vopd": {"opd_baseline": "full"},
    "tip_q3": {"tip_rule": "q3", "teacher_top_k": 4},
    "tip_sample": {"tip_rule": "entropy_sample", "tip_keep_ratio": 0.5},
    "scope": {"opd_weighting": "scope"},
    "uni_opd": {"opd_weighting": "uni_opd", "uni_opd_delta": 0.5},
    "sod": {"opd_weighting": "sod", "sod_step_delimiter": "5"},
    "luffy": {"opd_trace_column": "trace", "loss_type": "grpo"},
    "divergence": {
        "opd_divergence": "reverse_kl", "opd_divergence_coef": 1.0, "teacher_top_k": 4,
        "opd_divergence_support": "topk",
    },
    # candidate sets: the student's top-k pass (a forward on every process) and the teacher's
    # scores at the union of both top-k; the top-k baseline from the teacher's hidden states
    "union": {
        "opd_divergence": "reverse_kl", "opd_divergence_coef": 1.0, "teacher_top_k": 4,
        "opd_divergence_support": "union", "opd_baseline": "topk", "opd_baseline_top_k": 6,
    },
    # METHODS.md s.10 (the stored sampler logprobs are -log V: the ratios scatter around 1)
    "ctpo": {"opd_ratio": "ctpo"},
    "bapo": {"opd_ratio": "bapo"},  # bounds chosen over the global generation batch
    "vcpo": {"opd_lr_ess_scaling": True, "opd_baseline": "min_variance"},
    "chord": {"opd_imitation_column": "trace", "opd_imitation_peak": 0.5,
              "opd_imitation_valley": 0.5, "opd_imitation_token_weight": "phi"},
    "hapo_bepa": {"opd_trace_column": "trace", "opd_trace_gate": "thompson",
                  "opd_trace_cache": True, "loss_type": "grpo"},
    "tcod": {"tcod_unit": "tokens", "tcod_start": 2, "tcod_end": 4, "tcod_ramp_steps": 2},
    # METHODS.md s.11: MOPD's peers come from groups split over processes (even copies are
    # correct, so every row has peers of both kinds); TRACE's spans from a global quantile
    "mopd": {"mopd_peers": "contrastive", "teacher_context_column": "trace",
             "teacher_context_template": "{context}={prompt}", "mopd_success_label": "ok",
             "mopd_failure_label": "no", "opd_divergence": "jsd", "opd_divergence_coef": 1.0,
             "opd_divergence_support": "topk", "teacher_top_k": 4},
    "trace": {"trace_annotator": "divergence", "trace_reverse_kl": True,
              "trace_span_quantile": 0.5, "trace_span_min_tokens": 1,
              "trace_kl_warmup_steps": 1, "trace_kl_decay_steps": 0,
              "opd_outcome_weight": 1.0, "opd_divergence": "forward_kl",
              "opd_divergence_coef": 1.0, "opd_divergence_support": "topk", "teacher_top_k": 4},
    # a teacher of another tokenizer (--bpe_teacher): span rewards and GOLD/ULD at span starts
    "cross_tokenizer": {"teacher_cross_tokenizer": True, "teacher_top_k": 4,
                        "opd_divergence": "jsd", "opd_divergence_coef": 1.0,
                        "opd_cross_vocab": "hybrid"},
}  # fmt: skip
NEEDS_REWARDS = ("scope", "uni_opd", "bapo", "hapo_bepa", "mopd", "trace")
FSDP2 = {  # a fully sharded FSDP2 run (also scripts/bench_scale.py's)
    "fsdp": "full_shard",
    "fsdp_config": {
        "fsdp_version": 2, "reshard_after_forward": True,
        "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
    },
}  # fmt: skip


def fixed_completion(prompt: str, copy: int, vocab_size: int) -> list[int]:
    """A completion that depends only on the prompt text and its index in the group."""
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) * 8 + copy)
    length = int(torch.randint(2, MAX_COMPLETION + 1, (1,), generator=generator))
    ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
    if copy % 2 == 0:  # even copies start with a digit: the reward below calls them correct
        ids[0] = 3 + copy
    return [*ids[:-1], 2] if copy != 1 else ids  # copy 1 is truncated (no EOS)


def make_rollout_func(tokenizer, completion_for, sampler_logprob: float = 0.0):
    """TRL's `rollout_func` for fixed rollouts: each row's completion is
    `completion_for(prompt, copy)`, `copy` its index in its group, whichever process holds it
    (also scripts/bench_scale.py's). Every token's stored sampler logprob is `sampler_logprob`
    (-log V: about the random student's, so the s.10 ratios scatter around 1)."""

    def rollout_func(prompts: list, trainer) -> dict[str, list]:
        first = trainer.accelerator.process_index * len(prompts)  # contiguous split of the batch
        completion_ids = [
            completion_for(prompt, (first + i) % trainer.num_generations)
            for i, prompt in enumerate(prompts)
        ]
        return {
            "prompt_ids": [tokenizer.encode(prompt) for prompt in prompts],
            "completion_ids": completion_ids,
            "logprobs": [[sampler_logprob] * len(ids) for ids in completion_ids],
        }

    return rollout_func


def starts_with_digit(completions, **kwargs) -> list[float]:
    return [float(bool(text) and text[0].isdigit()) for text in completions]


def train_one(name: str, cli: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cli.student)
    # The model's vocabulary, not len(tokenizer): the reloaded char tokenizer counts one more.
    student_vocab_size = AutoConfig.from_pretrained(cli.student).vocab_size
    fsdp = {}
    teacher = None
    if cli.deepspeed:  # ZeRO-3 (CUDA only: tests/gpu/test_zero3_trainer_cuda.py)
        from opd.teacher.local import LocalTeacher

        # Loaded before the DeepSpeed config exists, so its weights stay whole.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        teacher = LocalTeacher.from_pretrained(cli.teacher, device=device)
        fsdp = {
            "deepspeed": {
                "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            },
        }  # fmt: skip
    if cli.fsdp:
        fsdp = FSDP2
    teacher_name = cli.bpe_teacher if name == "cross_tokenizer" else cli.teacher
    args = OPDConfig(
        output_dir=os.path.join(cli.out, name), report_to="none", seed=0,
        teacher_model_name_or_path=teacher_name, use_vllm=False,
        per_device_train_batch_size=cli.per_device_batch,
        gradient_accumulation_steps=cli.accumulation, num_generations=GROUP,
        max_completion_length=MAX_COMPLETION, max_steps=2, learning_rate=0.5,
        optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no",
        opd_behaviour_logprobs="trainer", bf16=cli.bf16,
        **fsdp, **{"opd_ratio": "plain", **METHODS[name]},
    )  # fmt: skip
    dataset = Dataset.from_dict(
        {
            "prompt": [f"{a}+{b}=" for a in range(3) for b in range(3)],
            "trace": [f"{a + b}" for a in range(3) for b in range(3)],
        }
    )
    trainer = OPDTrainer(
        model=cli.student, args=args, train_dataset=dataset, processing_class=tokenizer,
        reward_funcs=[starts_with_digit] if name in NEEDS_REWARDS else None,
        rollout_func=make_rollout_func(
            tokenizer, partial(fixed_completion, vocab_size=student_vocab_size),
            sampler_logprob=-math.log(student_vocab_size),
        ),
        teacher=teacher,
    )  # fmt: skip
    trainer.train()
    if cli.fsdp:  # the run must really have been sharded, not silently plain DDP
        from torch.distributed.tensor import DTensor

        weight = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
        assert isinstance(weight, DTensor), f"lm_head weight is {type(weight)}, not sharded"
        assert str(trainer.accelerator.distributed_type) == "DistributedType.FSDP"
        print(f"FSDP2 ok: lm_head shard {tuple(weight.to_local().shape)} of {tuple(weight.shape)}")
    state = trainer.accelerator.get_state_dict(trainer.model)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if trainer.accelerator.is_main_process:
        full = {key: value.detach().float().cpu() for key, value in state.items()}
        torch.save({"state": full, "losses": losses}, os.path.join(cli.out, f"{name}.pt"))
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--bpe_teacher", help="The cross_tokenizer method's teacher.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--per_device_batch", type=int, default=None)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument(
        "--layouts", default=None,
        help="Several 1-process layouts in one launch, 'ROWSxSTEPS,...' (e.g. 4x1,2x2): each "
        "one's weights go to OUT/ROWSxSTEPS/ (saves a launch's imports).",
    )  # fmt: skip
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    cli = parser.parse_args()
    layouts = [(cli.out, cli.per_device_batch, cli.accumulation)]
    if cli.layouts:
        layouts = [
            (os.path.join(cli.out, layout), *map(int, layout.split("x")))
            for layout in cli.layouts.split(",")
        ]
    for out, rows, steps in layouts:
        os.makedirs(out, exist_ok=True)
        layout_cli = argparse.Namespace(**{**vars(cli), "out": out, "per_device_batch": rows,
                                           "accumulation": steps})  # fmt: skip
        torch.manual_seed(0)
        for name in cli.methods.split(","):
            train_one(name, layout_cli)


if __name__ == "__main__":
    main()
