"""Fixed rollouts from teacher-score shards as the trainer's rollout source (Lightning OPD).

In `teacher_mode: offline` nothing is generated: the rollouts that `opd rollout` sampled once and
`opd teacher precompute` scored are replayed. The training dataset has one row per prompt
(`opd_group`); TRL's sampler repeats each prompt `num_generations` times in a row, and the k-th
copy of a prompt in the global generation batch takes the prompt's k-th stored rollout. The
rollouts reach TRL through its `rollout_func` hook, so TRL's padding, logging and loss run
unchanged, and the teacher's stored scores for exactly those rows go to the objective (and, from
shards with hidden states, the teacher's stored hidden states: `completion_hidden_states` of the
`OfflineHiddenStateTeacher`, which knows the rows this class selected through `batch_for_rows`).

Test: `pytest tests/integration/test_distill_teacher_modes.py -k offline
tests/integration/test_offline_hidden.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset

from opd.arguments import ConfigError
from opd.types import TeacherScores

GROUP_COLUMN = "opd_group"
# Per-rollout columns: they differ between the rollouts of one prompt, so the prompt row drops them.
ROLLOUT_COLUMNS = {
    "sample_index",
    "completion_ids",
    "sampler_logprobs",
    "stop_reason",
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "teacher_hidden_states",
    "teacher_span_start",
    "completion",
}


class OfflineRollouts:
    """Replays the rollouts stored next to an `OfflineTeacher`'s scores, group by group."""

    def __init__(self, teacher, *, num_generations: int):
        self.teacher = teacher
        self.groups = teacher.grouped_rows()
        smallest = min(len(group) for group in self.groups)
        if num_generations > smallest:
            raise ConfigError(
                f"num_generations={num_generations} but the shards in {teacher.shards_dir} hold "
                f"only {smallest} rollout(s) for some prompt: set num_generations <= {smallest}, "
                "or run `opd rollout` with more --num_generations."
            )
        self.num_generations = num_generations
        self._rows: list[int] = []
        self._scores: TeacherScores | None = None

    def prompt_dataset(self) -> Dataset:
        """One row per prompt: its text (TRL needs `prompt`), pass-through columns, group id."""
        rollouts = self.teacher.dataset()
        if "prompt" not in rollouts.column_names:
            raise ConfigError(
                f"the shards in {self.teacher.shards_dir} have no `prompt` column; write them "
                "with `opd rollout` (which keeps the prompt text) or add one."
            )
        prompts = rollouts.select([group[0] for group in self.groups])
        prompts = prompts.remove_columns(
            [name for name in prompts.column_names if name in ROLLOUT_COLUMNS]
        )
        return prompts.add_column(GROUP_COLUMN, list(range(len(self.groups))))

    def select(self, inputs: list[dict[str, Any]], *, process_index: int = 0) -> None:
        """Pick the stored rollout for each input of this process's slice of the batch.

        The global generation batch is consecutive runs of `num_generations` copies of a
        prompt, split evenly over processes, so an input's position in its run is its global
        position modulo `num_generations`.
        """
        first = process_index * len(inputs)
        self._rows = [
            self.groups[row[GROUP_COLUMN]][(first + i) % self.num_generations]
            for i, row in enumerate(inputs)
        ]

    def rollout_func(self, prompts: list, trainer) -> dict[str, list]:
        """TRL's `rollout_func` hook: the selected rollouts as token ids and sampler logprobs."""
        batch, self._scores = self.teacher.batch_for_rows(self._rows)
        lengths_B = batch.completion_mask_BT.sum(dim=1).tolist()
        completion_ids = [
            ids[:length].tolist()
            for ids, length in zip(batch.completion_ids_BT, lengths_B, strict=True)
        ]
        sampler_BT = batch.sampler_logprobs_BT
        logprobs = [
            sampler_BT[row, :length].tolist() if sampler_BT is not None else [0.0] * length
            for row, length in enumerate(lengths_B)
        ]
        return {
            "prompt_ids": batch.prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": logprobs,
        }

    def scores(self, num_tokens: int) -> TeacherScores:
        """The stored scores of the selected rollouts, padded to TRL's completion width."""
        scores = self._scores
        width = scores.sampled_logprobs_BT.shape[1]
        if width == num_tokens:
            return scores
        pad = num_tokens - width

        def fit(tensor: torch.Tensor | None, value: float) -> torch.Tensor | None:
            if tensor is None:
                return None
            if pad < 0:
                return tensor[:, :num_tokens]
            shape = (tensor.shape[0], pad, *tensor.shape[2:])
            return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype)], dim=1)

        return TeacherScores(
            sampled_logprobs_BT=fit(scores.sampled_logprobs_BT, 0.0),
            completion_mask_BT=fit(scores.completion_mask_BT, 0),
            topk_ids_BTK=fit(scores.topk_ids_BTK, 0),
            topk_logprobs_BTK=fit(scores.topk_logprobs_BTK, -torch.inf),
            teacher_id=scores.teacher_id,
            temperature=scores.temperature,
            metrics=scores.metrics,
            span_start_BT=fit(scores.span_start_BT, False),
        )
