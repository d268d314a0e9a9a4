"""The method-specific parts of `OPDTrainer`, as a mixin over `GRPOTrainer`.

Each method of METHODS.md that needs more than the composer reads its inputs here: off-policy
traces in the group (LUFFY, StableOPD), correctness from the first reward function (SCOPE,
Uni-OPD), SOD's step boundaries, TIP's kept tokens, OPSD's privileged teacher prompts and
multi-teacher routes from dataset columns. Values of the current generation step are read from
and written to its `StepState` (`opd/trainer/step.py`).

Test: `pytest tests/integration/test_methods.py`.
"""

from __future__ import annotations

from functools import partial

import torch

from opd.objectives.tip import tip_keep_mask
from opd.objectives.vanilla import masked_mean
from opd.objectives.weightings import scope_advantage, sod_step_weights, uni_opd_shift
from opd.report.token_sample import append_tip_token_sample
from opd.rollout.traces import inject_traces, trace_rows
from opd.trainer.distributed import on_global_batch
from opd.trainer.trl_seams import prompt_render_kwargs
from opd.types import DepthUnit, TipRule, Weighting


class MethodMixin:
    """Hooks used by `OPDTrainer`; `self` is the trainer (a `GRPOTrainer`)."""

    # ----- generation: traces and rewards -----

    def _generate(self, prompts: list):
        guided = self.args.uses_prefix and self.model.training
        if guided:  # POPE, PrefixRL, Prefix-RFT: `_tokenize_prompts` appends the prefixes
            self.plan_prefixes(prompts)
        generated = super()._generate(prompts)
        if guided:
            generated = self.place_prefixes(generated, isinstance(prompts[0], list))
        column = self.args.opd_trace_column
        num_rows = len(generated[1])
        step = self.step_state
        step.offpolicy_B = [False] * num_rows
        if column is None or not self.model.training:
            return generated
        inputs = step.inputs
        if column not in inputs[0]:
            raise ValueError(f"opd_trace_column={column!r} is not a column of the dataset.")
        rows = trace_rows(
            num_rows,
            group_size=self.num_generations,
            first_global_index=self.accelerator.process_index * num_rows,
        )
        traces = [example.get(column) for example in inputs]
        if self.trace_ledger is not None:  # gated insertion (HAPO, BEPA): grade, then decide
            rows, traces = self.gate_trace_rows(prompts, generated, rows, traces)
        generated, step.offpolicy_B = inject_traces(
            generated,
            traces,
            rows,
            tokenizer=self.processing_class,
            max_completion_length=self.max_completion_length,
            conversational=isinstance(prompts[0], list),
        )
        return generated

    def trl_rewards(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        """TRL's `[global rows, reward functions]` rewards (a collective), not stored."""
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        return (self.with_prefixes(prompt_ids), *rest)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args):
        if self.args.uses_prefix and self.model.training and self.vllm_mode == "server":
            num_generations = 1  # a group's rows may differ by their prefix: one sample each
        return super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, *args
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = self.trl_rewards(inputs, prompts, completions, completion_ids_list)
        start = self.accelerator.process_index * len(prompts)
        step = self.step_state
        step.rewards_BF = rewards_per_func[start : start + len(prompts)]
        step.rewards_GF = rewards_per_func
        step.completions = completions
        if self.model.training:
            self.record_prefix_outcomes(step, rewards_per_func)
        return rewards_per_func

    # ----- teacher inputs from dataset columns -----

    def teacher_prompt_ids(self, inputs) -> list[list[int]] | None:
        """The teacher's own prompt ids per row (None: the student's): MOPD's peer context,
        else OPSD's privileged column; with a prompt-placed guiding prefix appended."""
        if self.args.teacher_cross_tokenizer and self.offline is None:
            return self.cross_tokenizer_prompt_ids(inputs)
        if self.args.uses_mopd and self.model.training:
            ids_B = self.mopd_teacher_prompt_ids(self.step_state)
        else:
            ids_B = self.privileged_prompt_ids(inputs)
        return self.prefix_teacher_prompt_ids(ids_B)

    def cross_tokenizer_prompt_ids(self, inputs) -> list[list[int]]:
        """A teacher of another tokenizer: every prompt (with OPSD's privileged column, if set)
        rendered by the teacher's own tokenizer and chat template."""
        from opd.teacher.context import teacher_prompt

        prompts = [example["prompt"] for example in inputs]
        column, template = context_column(self.args, inputs), self.args.teacher_context_template
        if column is not None:
            prompts = [
                teacher_prompt(prompt, str(example[column]), template)
                for prompt, example in zip(prompts, inputs, strict=True)
            ]
        return self.teacher.render_prompt_ids(prompts, **prompt_render_kwargs(self))

    def privileged_prompt_ids(self, inputs) -> list[list[int]] | None:
        """OPSD: the teacher's prompt = the problem plus the privileged column (e.g. solution)."""
        column = context_column(self.args, inputs)
        if column is None:
            return None
        from opd.teacher.context import teacher_prompt_ids

        return teacher_prompt_ids(
            [example["prompt"] for example in inputs],
            [str(example[column]) for example in inputs],
            self.args.teacher_context_template,
            self.processing_class,
            **prompt_render_kwargs(self),  # as TRL renders the student's prompt
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
        if self.args.opd_weighting != Weighting.SOD and self.args.tcod_unit != DepthUnit.STEPS:
            return set()
        ids = self.processing_class.encode(self.args.sod_step_delimiter, add_special_tokens=False)
        if not ids:
            raise ValueError("sod_step_delimiter encodes to no tokens; give a non-empty text.")
        return {ids[-1]}

    def weighted_opd_term(self, step, term_BT, output, teacher_BT):
        args, student_old_BT, mask_BT = self.args, step.student_old_BT, step.mask_BT
        match args.opd_weighting:
            case Weighting.SCOPE:  # groups may span processes: decided on the global batch
                scope = partial(
                    scope_advantage, group_size=self.num_generations, tau=args.scope_tau
                )
                return on_global_batch(
                    self.accelerator, scope, student_old_BT, teacher_BT, mask_BT,
                    step.correct_B().to(mask_BT.device),
                )  # fmt: skip
            case Weighting.SOD:
                ids_BT = output["completion_ids"]
                step_end_BT = torch.isin(
                    ids_BT, torch.tensor(sorted(self.sod_step_ids), device=ids_BT.device)
                )
                weights_BT = sod_step_weights(
                    student_old_BT, teacher_BT, mask_BT, step_end_BT, delta=args.sod_delta
                )
                self.record("opd/sod_weight_mean", masked_mean(weights_BT, mask_BT))
                return term_BT * weights_BT
            case Weighting.UNI_OPD:
                shift = partial(
                    uni_opd_shift, group_size=self.num_generations, delta=args.uni_opd_delta
                )
                return on_global_batch(
                    self.accelerator, shift, term_BT, mask_BT, step.correct_B().to(mask_BT.device)
                )
        return term_BT

    def keep_mask(self, step) -> torch.Tensor:
        """TIP's kept tokens, chosen over the global generation batch (quantiles and the kept
        share are the whole batch's, as with one process), then this process's rows."""
        args, stats_BT, mask_BT = self.args, step.stats_BT, step.mask_BT
        if args.tip_rule == TipRule.NONE:
            return mask_BT.bool()
        # No stats: no valid token on this process. Entropy-only rules ignore the divergence.
        zeros_BT = torch.zeros_like(mask_BT)
        entropy_BT = zeros_BT if stats_BT is None else stats_BT.entropy
        jsd_BT = None if stats_BT is None else stats_BT.jsd

        def select(entropy_BT, jsd_BT, mask_BT):
            generator = torch.Generator().manual_seed(args.seed + self.state.global_step)
            return tip_keep_mask(
                args.tip_rule, entropy_BT.cpu(), jsd_BT.cpu(), mask_BT.cpu(),
                vocab_size=self.student_vocab_size(), keep_ratio=args.tip_keep_ratio,
                alpha=args.tip_alpha, gamma=args.tip_gamma,
                entropy_quantile=args.tip_entropy_quantile,
                divergence_quantile=args.tip_divergence_quantile, generator=generator,
            ).to(mask_BT.device)  # fmt: skip

        keep_BT = on_global_batch(
            self.accelerator, select, entropy_BT, zeros_BT if jsd_BT is None else jsd_BT, mask_BT
        )
        if self.model.training and self.accelerator.is_main_process:  # `opd report`'s TIP scatter
            append_tip_token_sample(
                args.output_dir, step=self.state.global_step + 1, rule=args.tip_rule,
                entropy_BT=entropy_BT, divergence_BT=jsd_BT, mask_BT=mask_BT, keep_BT=keep_BT,
                vocab_size=self.student_vocab_size(), entropy_quantile=args.tip_entropy_quantile,
                divergence_quantile=args.tip_divergence_quantile, seed=args.seed,
            )  # fmt: skip
        return keep_BT.to(mask_BT.device)

    def student_vocab_size(self) -> int:
        return int(
            self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        )


def context_column(args, inputs) -> str | None:
    """`teacher_context_column`, checked against the dataset's columns."""
    column = args.teacher_context_column
    if column is not None and column not in inputs[0]:
        raise ValueError(f"teacher_context_column={column!r} is not a column of the dataset.")
    return column
