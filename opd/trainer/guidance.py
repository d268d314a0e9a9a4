"""The context and rollout hooks of METHODS.md s.11, as an `OPDTrainer` mixin.

- **Multi-rollout MOPD** (`mopd_peers`): after rewards, each rollout's teacher prompt is built
  from the other rollouts of its group (`opd/teacher/peer_context.py`), over the *global* batch
  (a group may span processes). Rows with neither a peer success nor a reference solution get no
  OPD term: their distillation and divergence masks are 0.
- **Prefix-guided rollouts** (`opd_prefix_column` / `opd_prefix_rollouts`): the first members of
  a guided prompt's group get a prefix of the source's tokens appended to their prompt ids before
  generation (`_tokenize_prompts`), so vLLM (or transformers) continues from prompt + prefix. With
  `opd_prefix_placement: prompt` (POPE, PrefixRL) the prefix stays in the prompt: conditioning,
  never trained; the teacher sees it there too. With `completion` (Prefix-RFT) it moves to the
  head of the completion, flagged `TokenSource.PREFIX` per token: the loss trains it by NLL or
  LUFFY's shaping, never as on-policy tokens, and it has no sampler logprob (NaN).
- **TRACE** (`trace_annotator`): spans from an annotator (or the default, runs of high
  teacher-student divergence) route each token to one loss term (`TermMasks`): the divergence term
  (forward KL) on key spans of correct rollouts, the sampled-token OPD term (reverse KL) on error
  spans of incorrect ones, the outcome advantage elsewhere; the KL channels fade after a warm-up.

Test: `pytest tests/integration/test_guidance_methods.py`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from accelerate.utils import gather_object

from opd.objectives.compose import TermMasks
from opd.objectives.spans import (
    SpanMasks,
    annotated_span_masks,
    divergence_span_masks,
    kl_anneal_coefficient,
    route_term_masks,
)
from opd.rewards import completion_text
from opd.rollout.prefix import (
    PrefixSchedule,
    cut_prefix_ids,
    gated_prompts,
    guided_rows,
    prefix_fraction,
    prefix_into_completion,
    prefix_source_mask,
    successful_rollout_traces,
)
from opd.rollout.trace_gate import PromptLedger, load_ledger, prompt_key, save_ledger
from opd.teacher.context import teacher_prompt_ids
from opd.teacher.peer_context import PeerContextSettings, groups_with_success, peer_contexts
from opd.trainer.distributed import on_global_batch
from opd.trainer.trl_seams import prompt_render_kwargs
from opd.types import PrefixGate, PrefixPlacement, TokenSource

PREFIX_LEDGER_FILE = "opd_prefix_ledger.json"


class GuidanceMixin:
    """Hooks used by `OPDTrainer`; `self` is the trainer (a `GRPOTrainer`)."""

    def build_guidance_parts(self, reward_funcs) -> None:
        """The prefix source of `opd_prefix_rollouts`, the per-prompt ledger of POPE's gate and
        TRACE's annotator (before any update)."""
        args = self.args
        self.prefix_sources: dict[str, str] | None = None
        if args.opd_prefix_rollouts is not None:
            self.prefix_sources = successful_rollout_traces(
                args.opd_prefix_rollouts, reward_funcs[0], self.processing_class
            )
        gated = args.uses_prefix and args.opd_prefix_gate == PrefixGate.FAILED
        self.prefix_ledger = PromptLedger() if gated else None
        self.span_annotator = _load_annotator(args.trace_annotator)

    # ----- MOPD: the teacher prompt from the group's peers -----

    def mopd_teacher_prompt_ids(self, step) -> list[list[int]]:
        """Each local row's teacher prompt ids, its context built from the global group (the
        peers' texts as the rewards graded them)."""
        args, tokenizer = self.args, self.processing_class
        texts_B = [completion_text(completion) for completion in step.completions]
        column = args.teacher_context_column
        if column is not None and column not in step.inputs[0]:
            raise ValueError(f"teacher_context_column={column!r} is not a column of the dataset.")
        references_B = [None if column is None else str(row[column]) for row in step.inputs]
        correct_G = step.global_correct().tolist()
        settings = PeerContextSettings(
            peers=args.mopd_peers, max_successes=args.mopd_max_successes,
            max_failures=args.mopd_max_failures, success_label=args.mopd_success_label,
            failure_label=args.mopd_failure_label,
        )  # fmt: skip
        contexts_G = peer_contexts(
            gather_object(texts_B), correct_G, group_size=self.num_generations,
            settings=settings, references_G=gather_object(references_B),
        )  # fmt: skip
        first = self.accelerator.process_index * len(texts_B)
        contexts_B = contexts_G[first : first + len(texts_B)]
        step.context_B = torch.tensor([context is not None for context in contexts_B])
        ids_B = teacher_prompt_ids(
            [row["prompt"] for row in step.inputs], [context or "" for context in contexts_B],
            args.teacher_context_template, tokenizer, **prompt_render_kwargs(self),
        )  # fmt: skip
        lengths = [len(ids) for ids, has in zip(ids_B, contexts_B, strict=True) if has is not None]
        self.record("opd/mopd_context_tokens", sum(lengths) / len(lengths) if lengths else 0.0)
        self.record("opd/mopd_context_fraction", float(step.context_B.float().mean()))
        self.record(
            "opd/mopd_groups_with_success",
            groups_with_success(correct_G, group_size=self.num_generations),
        )
        return ids_B

    # ----- prefix-guided rollouts (generation) -----

    def plan_prefixes(self, prompts) -> list[list[int] | None]:
        """The prefix ids of each local row for this step (None: unguided)."""
        args, step = self.args, self.step_state
        num_rows = len(prompts)
        guided_per_group = args.opd_prefix_guided or max(1, self.num_generations // 2)
        rows = guided_rows(
            num_rows, group_size=self.num_generations,
            first_global_index=self.accelerator.process_index * num_rows,
            guided_per_group=guided_per_group,
        )  # fmt: skip
        keys = [prompt_key(row["prompt"]) for row in step.inputs]
        gate_B = gated_prompts(str(args.opd_prefix_gate), keys, self.prefix_ledger)
        schedule = PrefixSchedule(
            start=args.opd_prefix_fraction_start, end=args.opd_prefix_fraction_end,
            ramp_steps=args.opd_prefix_ramp_steps, shape=str(args.opd_prefix_schedule),
        )  # fmt: skip
        fraction = prefix_fraction(self.state.global_step, schedule)
        in_completion = args.opd_prefix_placement == PrefixPlacement.COMPLETION
        max_tokens = self.max_completion_length - 1 if in_completion else 1 << 30
        plan: list[list[int] | None] = [None] * num_rows
        for row in rows:
            source = self._prefix_source(step.inputs[row], keys[row])
            if not gate_B[row] or not source:
                continue
            ids = self.processing_class.encode(source, add_special_tokens=False)
            plan[row] = cut_prefix_ids(ids, fraction, max_tokens=max_tokens) or None
        step.prefix_ids_B = plan
        self.record("opd/prefix_fraction", fraction)
        return plan

    def _prefix_source(self, example, key: str) -> str | None:
        if self.prefix_sources is not None:
            return self.prefix_sources.get(key)
        column = self.args.opd_prefix_column
        if column not in example:
            raise ValueError(f"opd_prefix_column={column!r} is not a column of the dataset.")
        value = example[column]
        return None if value is None else str(value)

    def with_prefixes(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """TRL's prompt ids with each guided row's prefix appended (what generation continues)."""
        plan = getattr(self.step_state, "prefix_ids_B", None)
        if plan is None or not self.model.training:
            return prompt_ids
        return [
            ids + prefix if prefix else ids for ids, prefix in zip(prompt_ids, plan, strict=True)
        ]

    def place_prefixes(self, generated: tuple, conversational: bool) -> tuple:
        """After generation: Prefix-RFT moves each prefix into its completion; POPE/PrefixRL
        leave it in the prompt. Either way the rewards grade the whole solution, prefix and
        continuation (a guided rollout's answer may sit in its prefix)."""
        step = self.step_state
        plan = step.prefix_ids_B
        prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest = generated
        step.prefix_len_B = [0] * len(plan)
        solutions = [prefix + list(ids) if prefix else None
                     for prefix, ids in zip(plan, completion_ids, strict=True)]  # fmt: skip
        if self.args.opd_prefix_placement == PrefixPlacement.COMPLETION:
            prompt_ids, completion_ids, logprobs, step.prefix_len_B = prefix_into_completion(
                prompt_ids, completion_ids, logprobs, plan,
                max_completion_length=self.max_completion_length,
            )  # fmt: skip
            lengths = step.prefix_len_B
            solutions = [ids if n else None for ids, n in zip(completion_ids, lengths, strict=True)]
        completions = list(completions)
        for row, ids in enumerate(solutions):
            if ids is not None:
                text = self.processing_class.decode(ids, skip_special_tokens=True)
                completions[row] = (
                    [{"role": "assistant", "content": text}] if conversational else text
                )
        return (prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest)

    def prefix_teacher_prompt_ids(self, teacher_ids_B: list[list[int]] | None):
        """POPE/PrefixRL: the teacher scores the continuation with the prefix in its context."""
        plan = getattr(self.step_state, "prefix_ids_B", None)
        if teacher_ids_B is None or plan is None:
            return teacher_ids_B
        if self.args.opd_prefix_placement != PrefixPlacement.PROMPT:
            return teacher_ids_B
        return self.with_prefixes(teacher_ids_B)

    def source_BT(self, step, num_tokens: int, device) -> torch.Tensor | None:
        """The per-token `TokenSource` of this process's rows (None: no prefix in completions
        here), and the logged share of prefix tokens (a collective when prefixes are on)."""
        lengths = step.prefix_len_B
        if lengths is None:  # no prefix-guided rollouts this step
            return None
        prefix_BT = prefix_source_mask(lengths, num_tokens).to(device)
        self.record_token_means({"opd/prefix_token_fraction": prefix_BT.float()}, step.mask_BT)
        if not any(lengths):
            return None
        source_BT = prefix_BT.to(torch.int8) * int(TokenSource.PREFIX)
        trace_B = torch.tensor(step.offpolicy_B or [False] * len(lengths), dtype=torch.bool)
        source_BT[trace_B.to(device)] = int(TokenSource.TRACE)
        return source_BT

    def record_prefix_outcomes(self, step, rewards_GF: torch.Tensor) -> None:
        """Log the guided share and groups with a reward; POPE's gate learns from the unguided
        rows (a guided success is not the policy's own)."""
        plan = getattr(step, "prefix_ids_B", None)
        if plan is None:
            return
        group = self.num_generations
        guided_G = torch.tensor(gather_object([bool(prefix) for prefix in plan]))
        reward_G = torch.nan_to_num(rewards_GF[:, 0].float().cpu(), nan=0.0)
        self.record("opd/prefix_guided_fraction", float(guided_G.float().mean()))
        nonzero = (reward_G.view(-1, group) != 0).any(dim=1).float().mean()
        self.record("opd/groups_with_reward_fraction", float(nonzero))
        if self.prefix_ledger is None:
            return
        keys_G = gather_object([prompt_key(row["prompt"]) for row in step.inputs])
        correct_G = reward_G >= 0.5
        for start in range(0, len(keys_G), group):
            unguided = ~guided_G[start : start + group]
            if unguided.any():
                correct_N = correct_G[start : start + group][unguided]
                self.prefix_ledger.update([keys_G[start]], correct_N[None], cache_successes=False)

    # ----- TRACE: one mask per loss term -----

    def term_masks(self, step, teacher_BT: torch.Tensor) -> TermMasks | None:
        """TRACE's routing and MOPD's rows without a context; None when neither is on."""
        args, mask_BT = self.args, step.mask_BT
        masks = None
        if args.uses_trace_routing:
            spans = self._span_masks(step, teacher_BT)
            coef = kl_anneal_coefficient(
                self.state.global_step, warmup_steps=args.trace_kl_warmup_steps,
                decay_steps=args.trace_kl_decay_steps,
            )  # fmt: skip
            masks = route_term_masks(
                spans, mask_BT, coef, forward_on_key=args.trace_forward_kl,
                reverse_on_error=args.trace_reverse_kl,
            )  # fmt: skip
            self.record("opd/trace_kl_coef", coef)
            self.record_token_means(
                {
                    "opd/trace_key_fraction": spans.key_BT,
                    "opd/trace_error_fraction": spans.error_BT,
                },
                mask_BT,
            )
        context_B = getattr(step, "context_B", None)
        if context_B is not None:  # MOPD rows without a context: no distillation term
            row_BT = context_B.to(mask_BT.device).float()[:, None].expand_as(mask_BT)
            if masks is None:
                masks = TermMasks(mask_BT.float(), row_BT * mask_BT, row_BT * mask_BT)
            else:
                masks = TermMasks(
                    masks.outcome_BT, masks.reverse_kl_BT * row_BT, masks.forward_kl_BT * row_BT
                )
        return masks

    def _span_masks(self, step, teacher_BT):
        mask_BT = step.mask_BT
        correct_B = step.correct_B().to(mask_BT.device)
        if self.span_annotator is None:  # the default: runs of high |lp_t - lp_old|
            divergence_BT = (teacher_BT - step.student_old_BT.float()).abs() * mask_BT

            def annotate(divergence_BT, mask_BT, correct_B):
                spans = divergence_span_masks(
                    divergence_BT, mask_BT, correct_B, quantile=self.args.trace_span_quantile,
                    min_tokens=self.args.trace_span_min_tokens,
                )  # fmt: skip
                # one [B, T] code (on_global_batch crops 2-D results): 1 key, 2 error, 3 both
                return spans.key_BT.to(torch.uint8) + 2 * spans.error_BT.to(torch.uint8)

            code = on_global_batch(self.accelerator, annotate, divergence_BT, mask_BT, correct_B)
            return SpanMasks(key_BT=(code & 1).bool(), error_BT=(code & 2).bool())
        ids_BT = step.batch.completion_ids_BT
        tokenizer = self.processing_class
        spans_B = []
        for row, example in enumerate(step.inputs):
            completion = tokenizer.decode(
                ids_BT[row][mask_BT[row].cpu().bool()].tolist(), skip_special_tokens=True
            )
            spans_B.append(
                self.span_annotator(
                    _prompt_text(example["prompt"]), completion, bool(correct_B[row])
                )
            )
        spans = annotated_span_masks(spans_B, ids_BT, mask_BT.cpu(), tokenizer)
        return type(spans)(spans.key_BT.to(mask_BT.device), spans.error_BT.to(mask_BT.device))

    # ----- checkpoints -----

    def save_guidance_state(self, checkpoint: Path) -> None:
        if self.prefix_ledger is not None and self.args.should_save:
            save_ledger(self.prefix_ledger, checkpoint / PREFIX_LEDGER_FILE)

    def load_guidance_state(self, checkpoint: str | Path) -> None:
        saved = load_ledger(Path(checkpoint) / PREFIX_LEDGER_FILE)
        if self.prefix_ledger is not None and saved is not None:
            self.prefix_ledger = saved


def _load_annotator(name: str):
    """None for 'none' and 'divergence' (built in); else the function at `module.function`."""
    if name in ("none", "divergence"):
        return None
    module_name, _, attribute = name.rpartition(".")
    if not module_name:
        raise ValueError(
            f"trace_annotator={name!r}: use 'none', 'divergence' or an import path module.function"
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"trace_annotator={name!r} cannot be imported: {error}") from None


def _prompt_text(prompt) -> str:
    """A prompt as text: a string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [message for message in prompt if message.get("role") == "user"]
    return str(users[-1]["content"]) if users else ""
