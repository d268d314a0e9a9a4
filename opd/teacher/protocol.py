"""`TeacherScorer`: the one protocol every teacher implements (local, server, vllm, offline).

A teacher scores `(teacher context ids, completion ids)` pairs: the teacher's logprob of each
sampled completion token and, when `top_k > 0`, its top-k ids and logprobs at each position.
Before training, `check_student_tokenizer` compares what the teacher knows about its own
tokenizer (the model's tokenizer, a server's `/info`, a stock vLLM server's `/tokenize`, a shard
manifest) with the student's and raises `ConfigError` naming every difference.
"""

from __future__ import annotations

from typing import Protocol

from opd.types import RolloutBatch, TeacherScores


class TeacherScorer(Protocol):
    """Anything that turns a `RolloutBatch` into `TeacherScores` of the same `[B, T]` shape."""

    teacher_id: str

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores: ...

    def check_student_tokenizer(self, student_tokenizer) -> None: ...
