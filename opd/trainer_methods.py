"""The method-specific parts of `OPDTrainer`, as a mixin over `GRPOTrainer`.

Each method of METHODS.md that needs more than the composer reads its inputs here: off-policy
traces in the group (LUFFY, StableOPD), correctness from the first reward function (SCOPE,
Uni-OPD), SOD's step boundaries, TIP's kept tokens, OPSD's privileged teacher prompts and
multi-teacher routes from dataset columns; and the per-step metrics of METHODS.md's last section,
logged through TRL's `_metrics` so they reach `report_to` like any TRL metric.

Test: `pytest tests/integration/test_methods.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from opd.objectives.repetition import repetition_rate
from opd.objectives.tip import kept_fraction, tip_keep_mask
from opd.objectives.vanilla import masked_mean
from opd.objectives.weightings import scope_advantage, sod_step_weights, uni_opd_shift
from opd.report.token_sample import append_tip_token_sample
from opd.rollout.traces import inject_traces, trace_rows


class MethodMixin:
    """Hooks used by `OPDTrainer`; `self` is the trainer (a `GRPOTrainer`)."""

    # ----- generation: traces and rewards -----

    def _generate(self, prompts: list):
        generated = super()._generate(prompts)
        column = self.args.opd_trace_column
        num_rows = len(generated[1])
        self.offpolicy_B = [False] * num_rows
        if column is None or not self.model.training:
            return generated
        inputs = self.batch_inputs
        if column not in inputs[0]:
            raise ValueError(f"opd_trace_column={column!r} is not a column of the dataset.")
        rows = trace_rows(
            num_rows,
            group_size=self.num_generations,
            first_global_index=self.accelerator.process_index * num_rows,
        )
        generated, self.offpolicy_B = inject_traces(
            generated,
            [example.get(column) for example in inputs],
            rows,
            tokenizer=self.processing_class,
            max_completion_length=self.max_completion_length,
            conversational=isinstance(prompts[0], list),
        )
        return generated

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        start = self.accelerator.process_index * len(prompts)
        self.local_rewards_BF = rewards_per_func[start : start + len(prompts)]
        return rewards_per_func

    def offpolicy_rows(self, num_rows: int, device) -> torch.Tensor:
        flags = getattr(self, "offpolicy_B", None) or [False] * num_rows
        return torch.tensor(flags, dtype=torch.bool, device=device)

    def correct_B(self) -> torch.Tensor:
        """Correct = the first reward function's reward >= 0.5 (a verifier's 0/1)."""
        return torch.nan_to_num(self.local_rewards_BF[:, 0], nan=0.0) >= 0.5

    # ----- teacher inputs from dataset columns -----

    def privileged_prompt_ids(self, inputs) -> list[list[int]] | None:
        """OPSD: the teacher's prompt = the problem plus the privileged column (e.g. solution)."""
        column = self.args.teacher_context_column
        if column is None:
            return None
        from opd.teacher.context import teacher_prompt_ids

        if column not in inputs[0]:
            raise ValueError(f"teacher_context_column={column!r} is not a column of the dataset.")
        return teacher_prompt_ids(
            [example["prompt"] for example in inputs],
            [str(example[column]) for example in inputs],
            self.args.teacher_context_template,
            self.processing_class,
        )

    def teacher_routes(self, inputs) -> list[str] | None:
        column = self.args.teacher_route_column
        if column is None:
            return None
        if column not in inputs[0]:
            raise ValueError(f"teacher_route_column={column!r} is not a column of the dataset.")
        return [str(example[column]) for example in inputs]

    # ----- weightings and token selection -----

    def build_sod_step_ids(self) -> set[int]:
        if self.args.opd_weighting != "sod":
            return set()
        ids = self.processing_class.encode(self.args.sod_step_delimiter, add_special_tokens=False)
        if not ids:
            raise ValueError("sod_step_delimiter encodes to no tokens; give a non-empty text.")
        return {ids[-1]}

    def weighted_opd_term(self, term_BT, output, student_old_BT, teacher_BT, mask_BT):
        args = self.args
        match args.opd_weighting:
            case "scope":
                return scope_advantage(
                    student_old_BT, teacher_BT, mask_BT, self.correct_B().to(mask_BT.device),
                    group_size=self.num_generations, tau=args.scope_tau,
                )  # fmt: skip
            case "sod":
                ids_BT = output["completion_ids"]
                step_end_BT = torch.isin(
                    ids_BT, torch.tensor(sorted(self.sod_step_ids), device=ids_BT.device)
                )
                weights_BT = sod_step_weights(
                    student_old_BT, teacher_BT, mask_BT, step_end_BT, delta=args.sod_delta
                )
                self.record("opd/sod_weight_mean", masked_mean(weights_BT, mask_BT))
                return term_BT * weights_BT
            case "uni_opd":
                return uni_opd_shift(
                    term_BT, mask_BT, self.correct_B().to(mask_BT.device),
                    group_size=self.num_generations, delta=args.uni_opd_delta,
                )  # fmt: skip
        return term_BT

    def keep_mask(self, stats: dict[str, torch.Tensor], mask_BT: torch.Tensor) -> torch.Tensor:
        args = self.args
        if args.tip_rule == "none":
            return mask_BT.bool()
        generator = torch.Generator(device="cpu").manual_seed(args.seed + self.state.global_step)
        jsd_BT = stats.get("jsd", torch.zeros_like(mask_BT))  # entropy-only rules ignore it
        keep_BT = tip_keep_mask(
            args.tip_rule, stats.get("entropy", torch.zeros_like(mask_BT)).cpu(), jsd_BT.cpu(),
            mask_BT.cpu(),
            vocab_size=self.student_vocab_size(), keep_ratio=args.tip_keep_ratio,
            alpha=args.tip_alpha, gamma=args.tip_gamma,
            entropy_quantile=args.tip_entropy_quantile,
            divergence_quantile=args.tip_divergence_quantile, generator=generator,
        )  # fmt: skip
        if self.model.training and self.accelerator.is_main_process:  # `opd report`'s TIP scatter
            append_tip_token_sample(
                args.output_dir, step=self.state.global_step + 1, rule=args.tip_rule,
                entropy_BT=stats.get("entropy", torch.zeros_like(mask_BT)),
                divergence_BT=stats.get("jsd"), mask_BT=mask_BT, keep_BT=keep_BT,
                vocab_size=self.student_vocab_size(), entropy_quantile=args.tip_entropy_quantile,
                divergence_quantile=args.tip_divergence_quantile, seed=args.seed,
            )  # fmt: skip
        return keep_BT.to(mask_BT.device)

    def student_vocab_size(self) -> int:
        return int(
            self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        )

    # ----- metrics (METHODS.md, "Signals to log on every run") -----

    def record(self, name: str, value: float) -> None:
        mode = "train" if self.model.training else "eval"
        gathered = self.accelerator.gather(torch.tensor(value, device=self.accelerator.device))
        self._metrics[mode][name].append(gathered.float().mean().item())

    def log_generation_metrics(self, output, student_old_BT, scores, stats, advantages_BT, mask_BT):
        teacher_BT = scores.sampled_logprobs_BT.to(student_old_BT.device)
        valid = mask_BT.bool()
        values = {
            "opd/reverse_kl_k1": masked_mean(student_old_BT - teacher_BT, mask_BT),
            "opd/teacher_logprob": masked_mean(teacher_BT, mask_BT),
            "opd/student_logprob": masked_mean(student_old_BT, mask_BT),
            "opd/advantage_mean": masked_mean(advantages_BT, mask_BT),
            "opd/advantage_std": float(advantages_BT[valid].std()) if valid.sum() > 1 else 0.0,
            "opd/kept_fraction": kept_fraction(output["opd_keep_mask"], mask_BT),
            "opd/repetition_rate": repetition_rate(_completion_lists(output)),
            "opd/offpolicy_fraction": float(output["opd_offpolicy"].float().mean()),
            **scores.metrics,
        }
        for name, key in (("reverse_kl", "reverse_kl"), ("entropy", "entropy"),
                          ("topk_mass", "topk_mass"), ("baseline_kl", "baseline_kl"),
                          ("jsd", "jsd")):  # fmt: skip
            if key in stats:
                values[f"opd/{name}"] = masked_mean(stats[key], mask_BT)
        if self.has_rewards:
            values["opd/accuracy"] = float(self.correct_B().float().mean())
        for name, value in values.items():
            self.record(name, value)

    def log_ratio_metrics(self, log_ratio_N: torch.Tensor) -> None:
        if log_ratio_N.numel() == 0:
            return
        ratio_N = torch.exp(log_ratio_N)
        self.record("opd/ratio_mean", float(ratio_N.mean()))
        self.record("opd/ratio_max", float(ratio_N.max()))
        self.record("opd/ratio_min", float(ratio_N.min()))
        if self.args.opd_ratio == "ppo":
            clipped = (ratio_N < 1 - self.epsilon_low) | (ratio_N > 1 + self.epsilon_high)
            self.record("opd/clip_fraction", float(clipped.float().mean()))

    def log_loss_metrics(self, token_N: dict[str, Any], loss, keep_BT, mask_BT) -> None:
        self.record("opd/loss", float(loss))
        if token_N["entropy"].numel():
            self.record("opd/kept_entropy", float(token_N["entropy"].detach().mean()))


def _completion_lists(output) -> list[list[int]]:
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(output["completion_ids"], output["completion_mask"], strict=True)
    ]
