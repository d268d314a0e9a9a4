"""Server-side batching of score requests: merge concurrent requests, score, split the answers.

`ScoreBatcher.score(request)` queues a request; one worker task takes the oldest request plus
the queued ones after it that fit in `max_batch_tokens` (real tokens), merges the requests that
ask for the same things (`ScoreRequest.group_key`: top-k, temperature, hidden states,
candidates) into one request, runs the backend on it in one dedicated thread
(the model is never used concurrently) and hands each request its slice of the scores.

A backend that pads a call to its longest sequence (`pads_batches`: transformers'
`LocalTeacher`) costs `sequences x longest` tokens of activations, not the sum of real tokens:
for it a group is cut into calls whose padded size stays within `max_batch_tokens`
(`plan_padded_calls`), shortest sequences together, and the answers are put back in order.

The merge / split / plan functions are pure. Used by `opd.teacher.server.create_app`.

Test: `.venv/bin/pytest tests/integration/test_teacher_server.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from opd.teacher.wire import ScoreRequest, SequenceScores, WireError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Merge and split (pure)
# ------------------------------------------------------------------------------------------------


def merge_requests(requests: list[ScoreRequest]) -> ScoreRequest:
    """Requests that ask for the same things (`group_key`) as one request, sequences in order."""
    assert len({r.group_key for r in requests}) == 1, "merge one group at a time"
    has_candidates = requests[0].candidate_ids_MC is not None
    return requests[0].with_sequences(
        context_ids_N=torch.cat([r.context_ids_N for r in requests]),
        context_lengths_B=torch.cat([r.context_lengths_B for r in requests]),
        completion_ids_M=torch.cat([r.completion_ids_M for r in requests]),
        completion_lengths_B=torch.cat([r.completion_lengths_B for r in requests]),
        candidate_ids_MC=torch.cat([r.candidate_ids_MC for r in requests])
        if has_candidates
        else None,
    )


def split_scores(scores: SequenceScores, num_sequences: list[int]) -> list[SequenceScores]:
    """Undo `merge_requests` on the scores: one `SequenceScores` per request, in order."""
    assert scores.completion_lengths_B.numel() == sum(num_sequences), (
        "the backend lost or added sequences"
    )
    return scores.split(num_sequences)


def group_requests(requests: list[ScoreRequest]) -> list[list[int]]:
    """Indices of the requests that can share a backend call (same `group_key`: top-k,
    temperature, hidden-state dtype and candidate width)."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.group_key, []).append(index)
    return list(groups.values())


def plan_padded_calls(request: ScoreRequest, max_padded_tokens: int) -> list[list[int]]:
    """The sequence indices of each backend call, so that a padding backend's call
    (sequences x longest) stays within `max_padded_tokens`.

    Shortest first, so each call pads little. A sequence longer than the budget is a call of its
    own (the server's `max_sequence_tokens` keeps that from happening).
    """
    lengths = (request.context_lengths_B + request.completion_lengths_B).tolist()
    if len(lengths) * max(lengths) <= max_padded_tokens:
        return [list(range(len(lengths)))]
    calls: list[list[int]] = [[]]
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending: the new sequence is the call's longest.
        if calls[-1] and (len(calls[-1]) + 1) * lengths[index] > max_padded_tokens:
            calls.append([])
        calls[-1].append(index)
    return calls


def select_sequences(request: ScoreRequest, indices: list[int]) -> ScoreRequest:
    """The sequences `indices` of `request`, in that order, as a request."""
    contexts = request.context_ids_N.split(request.context_lengths_B.tolist())
    completion_lengths = request.completion_lengths_B.tolist()
    completions = request.completion_ids_M.split(completion_lengths)
    index_B = torch.tensor(indices, dtype=torch.int64)
    candidates_MC = None
    if request.candidate_ids_MC is not None:
        rows = request.candidate_ids_MC.split(completion_lengths)
        candidates_MC = torch.cat([rows[i] for i in indices])
    return request.with_sequences(
        context_ids_N=torch.cat([contexts[i] for i in indices]),
        context_lengths_B=request.context_lengths_B[index_B],
        completion_ids_M=torch.cat([completions[i] for i in indices]),
        completion_lengths_B=request.completion_lengths_B[index_B],
        candidate_ids_MC=candidates_MC,
    )


def gather_scores(parts: list[SequenceScores], calls: list[list[int]]) -> SequenceScores:
    """Undo `plan_padded_calls`: the calls' scores as one, in the request's sequence order."""
    per_sequence: dict[int, SequenceScores] = {}
    for scores, indices in zip(parts, calls, strict=True):
        per_sequence.update(zip(indices, split_scores(scores, [1] * len(indices)), strict=True))
    return SequenceScores.concat([per_sequence[i] for i in range(len(per_sequence))])


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


@dataclass
class ServeStats:
    """Traffic served since start-up (exposed in `/info`)."""

    requests: int = 0
    sequences: int = 0
    tokens: int = 0
    batches: int = 0
    backend_calls: int = 0  # `score_sequences` calls: a batch makes one per group, or more padded


@dataclass
class _Pending:
    request: ScoreRequest
    future: asyncio.Future = field(repr=False)


class ScoreBatcher:
    """Queue of pending requests and the one worker task that scores them in token-budget batches.

    The worker starts with the first request (on the serving event loop) and is cancelled by
    `close()`. With `pads_batches`, each backend call also stays within `max_batch_tokens` once
    padded (`plan_padded_calls`).
    """

    def __init__(self, backend, *, max_batch_tokens: int, pads_batches: bool = False):
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.pads_batches = pads_batches
        self.stats = ServeStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None  # taken from the queue but over the last budget
        self._worker: asyncio.Task | None = None
        # One dedicated thread for every backend call: torch's OpenMP pool belongs to the thread
        # that calls it, and `asyncio.to_thread` rotates over threads, each call then paying for
        # (and spinning against) another pool. Measured: +17% per batch on 2 cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher")

    async def score(self, request: ScoreRequest) -> SequenceScores:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._score_batch(batch)
            except Exception as error:  # a bug outside the backend: fail this batch, keep serving
                logger.exception("scoring a batch failed")
                _fail([p.future for p in batch], error)

    async def _next_batch(self) -> list[_Pending]:
        """The oldest request plus the queued ones after it that fit in the token budget."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, num_tokens = [first], first.request.num_tokens
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if num_tokens + pending.request.num_tokens > self.max_batch_tokens:
                self._carry = pending
                break
            batch.append(pending)
            num_tokens += pending.request.num_tokens
        return batch

    async def _score_batch(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        requests = [pending.request for pending in batch]
        for group in group_requests(requests):
            futures = [batch[i].future for i in group]
            merged = merge_requests([requests[i] for i in group])
            try:
                scores = await self._score_group(merged)
                parts = split_scores(scores, [requests[i].num_sequences for i in group])
            except WireError as error:  # the backend's own limit: the clients' fault, no trace
                logger.info("the backend refused %d requests: %s", len(group), error)
                _fail(futures, error)
                continue
            except Exception as error:
                logger.exception("the backend failed on %d sequences", merged.num_sequences)
                _fail(futures, error)
                continue
            for future, part in zip(futures, parts, strict=True):
                if not future.done():  # done: the client went away and the handler was cancelled
                    future.set_result(part)
        self._count(requests)
        logger.debug(
            "scored %d requests, %d sequences, %d tokens in %.1f ms",
            len(requests),
            sum(r.num_sequences for r in requests),
            sum(r.num_tokens for r in requests),
            1000 * (time.perf_counter() - start),
        )

    async def _score_group(self, merged: ScoreRequest) -> SequenceScores:
        """One backend call, or for a padding backend as many as keep each within the budget."""
        calls = [list(range(merged.num_sequences))]
        if self.pads_batches:
            calls = plan_padded_calls(merged, self.max_batch_tokens)
        parts = []
        for indices in calls:
            request = merged if len(calls) == 1 else select_sequences(merged, indices)
            self.stats.backend_calls += 1
            parts.append(
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.backend.score_sequences, request
                )
            )
        return parts[0] if len(calls) == 1 else gather_scores(parts, calls)

    def _count(self, requests: list[ScoreRequest]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(requests)
        self.stats.sequences += sum(r.num_sequences for r in requests)
        self.stats.tokens += sum(r.num_tokens for r in requests)


def _fail(futures: list[asyncio.Future], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
