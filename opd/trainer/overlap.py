"""Teacher scoring overlapped with vLLM generation (`teacher_overlap`).

Serially, a step generates the whole batch and then asks `teacher.score(batch)`: a remote
teacher's latency adds to the step. Overlapped, each sequence goes to the teacher the moment vLLM
finishes it, and the step waits only for what is still being scored when it needs the scores.

- **Streaming.** `trl_seams.watch_finished_requests` reports each request of the colocated
  engine at the engine step that finishes it, with its index in the generate call (= its row:
  TRL's colocate mode sends this process's rows in order, one request per row, `n=1`). Finished
  rows wait in a queue; after each engine step the queue goes to the teacher as one
  `teacher.score` call of a small `RolloutBatch` (on a worker thread) when no call is running,
  when it holds `teacher_batch_size` rows, or when generation is over. So whatever finished while
  the teacher was busy goes in the next call, and the teacher client spreads a large one over
  its URLs as it does today. The teacher context of a row (the student prompt, or the OPSD
  privileged prompt; its route) comes from the step's dataset rows, known before generation.
- **Assembly.** `StreamingTeacher.score(batch, top_k)` is `teacher.score(batch, top_k)`: same
  `[B, T]` layout (built by `scores_from_sequences`), same values. Rows are matched by content,
  `(route, teacher context ids, completion ids)`, so a row TRL changed after generation (e.g.
  masked as truncated) can never take another row's scores; rows not streamed are scored then.
- **Errors.** A streamed call's exception is raised by `score` in the trainer's thread, so a
  `TeacherUnavailableError` takes the serial path's emergency checkpoint.
- **Metrics.** `teacher/overlap_s` (teacher time before the step started waiting: hidden behind
  generation and TRL's post-processing), `teacher/wait_s` (what the step waited),
  `teacher/latency_s` (teacher busy time), `teacher/streamed_rows`.

Test: `pytest tests/integration/test_teacher_overlap.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from opd.arguments import ConfigError
from opd.teacher.protocol import TeacherScorer
from opd.teacher.routed import select_rows
from opd.teacher.wire import SequenceScores, request_from_batch, scores_from_sequences
from opd.trainer.trl_seams import colocated_llm, watch_finished_requests
from opd.types import RolloutBatch, TeacherScores

# (route, teacher context ids, completion ids): what a teacher's score of a row depends on.
RowKey = tuple[str | None, tuple[int, ...], tuple[int, ...]]
# One row's scores: sampled [T], top-k ids [T, K] and logprobs [T, K] (None without top-k).
RowScores = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class _Row:
    """A finished sequence, as the teacher will see it."""

    key: RowKey
    prompt_ids: list[int]


@dataclass
class _Call:
    """One streamed `teacher.score` call: its rows, its result, and when its worker ran it."""

    keys: list[RowKey]
    future: Future = field(default_factory=Future)
    started_s: float = 0.0
    finished_s: float = 0.0


@dataclass
class _Session:
    """What one generate call has streamed so far."""

    teacher_prompt_ids: list[list[int]] | None
    routes: list[str] | None
    num_rows: int
    policy_version: int
    queued: list[_Row] = field(default_factory=list)
    calls: list[_Call] = field(default_factory=list)


class StreamingTeacher:
    """A `TeacherScorer` over `teacher` that scores the rows `streaming` saw finish as they did.

    Args:
        teacher: the remote teacher (any `TeacherScorer` whose scores of a row do not depend on
            the other rows of its batch).
        llm: the colocated `vllm.LLM` whose generate calls are streamed.
        top_k: the teacher top-k the trainer asks for (`teacher_top_k`).
        batch_size: the most rows one streamed call waits to gather (`teacher_batch_size`).
    """

    def __init__(self, teacher: TeacherScorer, llm, *, top_k: int, batch_size: int):
        self.teacher = teacher
        self.llm = llm
        self.top_k = top_k
        self.batch_size = batch_size
        # Streamed calls run here, never on the teacher client's own pool (it may use that pool
        # inside `score`); normally one runs, plus the final flush.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="opd-teacher-stream")
        self._session: _Session | None = None

    @property
    def teacher_id(self) -> str:
        return self.teacher.teacher_id

    def check_student_tokenizer(self, student_tokenizer) -> None:
        self.teacher.check_student_tokenizer(student_tokenizer)

    @contextmanager
    def streaming(
        self,
        num_rows: int,
        *,
        teacher_prompt_ids: list[list[int]] | None = None,
        routes: list[str] | None = None,
        policy_version: int = 0,
    ) -> Iterator[None]:
        """Stream the rows that the `llm.generate` call inside the block finishes.

        Args:
            num_rows: rows of the generate call (requests past it are scored afterwards).
            teacher_prompt_ids: per row, the teacher's own context (OPSD); None: the prompt.
            routes: per row, which teacher scores it (multi-teacher); None: the only one.
        """
        self._session = _Session(teacher_prompt_ids, routes, num_rows, policy_version)
        with watch_finished_requests(self.llm, self._finished, self._after_step):
            yield

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        """`teacher.score(batch, top_k)`, from the streamed calls plus one call for the rest."""
        session, self._session = self._session, None
        if session is None or top_k != self.top_k:  # nothing streamed for this batch
            return self.teacher.score(batch, top_k=top_k)
        waited_from = time.perf_counter()
        streamed, results = self._collect(session)
        request, rows = request_from_batch(batch)
        if not rows:  # every row masked: nothing to send, the teacher gives the shapes
            return self.teacher.score(batch, top_k=top_k)
        routes = batch.teacher_route_B
        keys = [
            (None if routes is None else routes[row], tuple(context), tuple(completion))
            for row, context, completion in zip(
                rows, request.contexts(), request.completions(), strict=True
            )
        ]
        missing = [i for i, key in enumerate(keys) if key not in streamed]
        rest_s = 0.0
        if missing:
            start = time.perf_counter()
            rest = self.teacher.score(select_rows(batch, [rows[i] for i in missing]), top_k=top_k)
            rest_s = time.perf_counter() - start
            results.append(rest)
            streamed.update(_rows_of(rest, [keys[i] for i in missing]))
        scores = _assembled([streamed[key] for key in keys], batch, rows, top_k, results)
        busy_s = _union_s([(c.started_s, c.finished_s) for c in session.calls])
        before_wait = [(c.started_s, min(c.finished_s, waited_from)) for c in session.calls]
        scores.metrics.update(
            {
                "teacher/latency_s": busy_s + rest_s,
                "teacher/overlap_s": _union_s(before_wait),
                "teacher/wait_s": time.perf_counter() - waited_from,
                "teacher/streamed_rows": float(len(rows) - len(missing)),
            }
        )
        return scores

    # ----- the engine's callbacks (trainer thread, inside an engine step) -----

    def _finished(self, index: int, output: Any) -> None:
        """Queue a finished request's row; one that cannot be streamed is scored afterwards."""
        session = self._session
        assert session is not None, "the engine is watched only inside `streaming`"
        if index >= session.num_rows or len(output.outputs) != 1:
            return
        completion = tuple(output.outputs[0].token_ids)
        if not completion:
            return
        prompt_ids = list(output.prompt_token_ids)
        context = prompt_ids
        if session.teacher_prompt_ids is not None:
            context = session.teacher_prompt_ids[index]
        route = None if session.routes is None else session.routes[index]
        session.queued.append(_Row((route, tuple(context), completion), prompt_ids))

    def _after_step(self, done: bool) -> None:
        """Send the queue when the teacher is idle, when it is a full call, or at the end."""
        session = self._session
        assert session is not None, "the engine is watched only inside `streaming`"
        if not session.queued:
            return
        idle = all(call.future.done() for call in session.calls)
        if done or idle or len(session.queued) >= self.batch_size:
            rows, session.queued = session.queued, []
            call = _Call(keys=[row.key for row in rows])
            self._pool.submit(self._score_call, call, _rollout_batch(rows, session.policy_version))
            session.calls.append(call)

    def _score_call(self, call: _Call, batch: RolloutBatch) -> None:
        """Score on a worker; the result or the error goes to `call.future` once timed."""
        call.started_s = time.perf_counter()
        try:
            scores = self.teacher.score(batch, top_k=self.top_k)
        except Exception as error:  # raised in the trainer's thread by `score`
            call.finished_s = time.perf_counter()
            call.future.set_exception(error)
        else:
            call.finished_s = time.perf_counter()
            call.future.set_result(scores)

    def _collect(self, session: _Session) -> tuple[dict[RowKey, RowScores], list[TeacherScores]]:
        """The streamed rows' scores and each call's result; the first failed call's error.

        Every call is waited for first (each is bounded by the teacher's retry budget), so no
        call is still running for this step when the error reaches the trainer.
        """
        wait([call.future for call in session.calls])
        streamed: dict[RowKey, RowScores] = {}
        results = []
        for call in session.calls:
            scores = call.future.result()  # raises the teacher's error, as the serial call would
            streamed.update(_rows_of(scores, call.keys))
            results.append(scores)
        return streamed, results


def build_teacher_stream(trainer) -> StreamingTeacher | None:
    """The trainer's `StreamingTeacher` when `teacher_overlap` is on, else None."""
    args = trainer.args
    if not args.teacher_overlap:
        return None
    if trainer.tools or trainer.environment_factories is not None:
        raise ConfigError(
            "teacher_overlap streams single-turn completions: set teacher_overlap: false to "
            "train with tools or environment_factory (multi-turn)."
        )
    return StreamingTeacher(
        trainer.teacher,
        colocated_llm(trainer.vllm_generation),
        top_k=args.teacher_top_k,
        batch_size=args.teacher_batch_size,
    )


def streaming_scores(trainer, inputs: list[dict[str, Any]]):
    """The block in which the trainer's generation of `inputs` is streamed to the teacher (a
    no-op without `teacher_overlap`)."""
    stream = trainer.teacher_stream
    if stream is None:
        return nullcontext()
    return stream.streaming(
        len(inputs),
        teacher_prompt_ids=trainer.privileged_prompt_ids(inputs),
        routes=trainer.teacher_routes(inputs),
        policy_version=trainer.state.global_step,
    )


def _rollout_batch(rows: list[_Row], policy_version: int) -> RolloutBatch:
    """The finished rows as a batch of their own (right-padded, every generated token valid)."""
    lengths = [len(row.key[2]) for row in rows]
    completion_ids_BT = torch.zeros(len(rows), max(lengths), dtype=torch.int64)
    for i, row in enumerate(rows):
        completion_ids_BT[i, : lengths[i]] = torch.tensor(row.key[2])
    mask_BT = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    routes = None if rows[0].key[0] is None else [str(row.key[0]) for row in rows]
    return RolloutBatch(
        prompt_ids=[row.prompt_ids for row in rows],
        completion_ids_BT=completion_ids_BT,
        completion_mask_BT=mask_BT,
        policy_version=policy_version,
        teacher_prompt_ids=[list(row.key[1]) for row in rows],
        teacher_route_B=routes,
    )


def _rows_of(scores: TeacherScores, keys: list[RowKey]) -> dict[RowKey, RowScores]:
    """Row i of `scores` (the batch of `keys`), cut to its completion's length."""
    rows = {}
    for i, key in enumerate(keys):
        length = len(key[2])
        topk = (None, None)
        if scores.topk_ids_BTK is not None and scores.topk_logprobs_BTK is not None:
            topk = (scores.topk_ids_BTK[i, :length], scores.topk_logprobs_BTK[i, :length])
        rows[key] = (scores.sampled_logprobs_BT[i, :length], *topk)
    return rows


def _assembled(
    row_scores: list[RowScores],
    batch: RolloutBatch,
    rows: list[int],
    top_k: int,
    results: list[TeacherScores],
) -> TeacherScores:
    """`[B, T]` scores of `batch` from each sent row's scores (in `rows` order), laid out as the
    teacher's own `score` does; teacher and temperature of the calls (`results`), their metrics
    summed."""
    topk_ids = [r[1] for r in row_scores if r[1] is not None]  # all rows or none
    topk_logprobs = [r[2] for r in row_scores if r[2] is not None]
    sequences = SequenceScores(
        completion_lengths_B=torch.tensor([len(r[0]) for r in row_scores], dtype=torch.int64),
        sampled_logprobs_M=torch.cat([r[0] for r in row_scores]),
        topk_ids_MK=torch.cat(topk_ids) if topk_ids else None,
        topk_logprobs_MK=torch.cat(topk_logprobs) if topk_logprobs else None,
    )
    metrics: dict[str, float] = {}
    for result in results:
        for name, value in result.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + float(value)
    return scores_from_sequences(
        sequences,
        batch,
        rows,
        teacher_id=results[0].teacher_id,
        temperature=results[0].temperature,
        top_k=top_k,
        metrics=metrics,
    )


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of `(start, end)` intervals (empty ones count 0)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(interval for interval in intervals if interval[1] > interval[0]):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered
