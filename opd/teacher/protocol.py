"""`TeacherScorer`: the one protocol every teacher implements (local, server, vllm, offline).

A teacher scores `(teacher context ids, completion ids)` pairs: the teacher's logprob of each
sampled completion token and, when `top_k > 0`, its top-k ids and logprobs at each position.
Before training, `check_student_tokenizer` compares what the teacher knows about its own
tokenizer (the model's tokenizer, a server's `/info`, a stock vLLM server's `/tokenize`, a shard
manifest) with the student's and raises `ConfigError` naming every difference.

`FullDistributionTeacher` is the extra a teacher in this process can give: its final hidden
states and lm_head, hence its whole distribution over the vocabulary without `[B, T, V]` logits
(vOPD's full baseline, full-vocabulary divergences, TIP's divergence without a top-k). The
trainer asks `isinstance(teacher, FullDistributionTeacher)`, never for a concrete class.

Test: `pytest tests/unit/test_local_teacher.py tests/integration/test_methods.py`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from opd.types import RolloutBatch, TeacherScores


class TeacherScorer(Protocol):
    """Anything that turns a `RolloutBatch` into `TeacherScores` of the same `[B, T]` shape."""

    teacher_id: str

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores: ...

    def check_student_tokenizer(self, student_tokenizer) -> None: ...


@runtime_checkable
class FullDistributionTeacher(TeacherScorer, Protocol):
    """A teacher whose full distribution is at hand: `softmax(hidden @ output_weight.T / T)`."""

    @property
    def output_weight(self) -> torch.Tensor:
        """The lm_head weight `[V, H]`."""
        ...

    def completion_hidden_states(self, batch: RolloutBatch) -> torch.Tensor:
        """`[B, T, H]` the final hidden state predicting each completion token of `batch` after
        the teacher's context."""
        ...


@runtime_checkable
class CandidateScorer(Protocol):
    """A teacher that returns its logprobs at any token ids (the student's top-k, a union):
    in-process teachers and `opd teacher serve` (transformers backend). A stock vLLM server
    cannot: its prompt logprobs cover the sampled token and vLLM's own top-k only."""

    def score_candidates(
        self, batch: RolloutBatch, candidate_ids_BTC: torch.Tensor, *, temperature=None
    ) -> torch.Tensor:
        """float32 `[B, T, C]` logprobs at `candidate_ids_BTC` (-1 pads; -inf there and at
        masked positions)."""
        ...
