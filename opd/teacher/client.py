"""`ServerTeacher`: the `TeacherScorer` that asks `opd teacher serve` servers over HTTP.

`score(batch, top_k)` turns the `[B, T]` batch into a ragged `ScoreRequest` (only real tokens
travel), cuts it into chunks of `batch_size` sequences and sends the chunks concurrently: chunk i
of call c starts at URL (c + i) % len(urls), so several servers share the load and one server
batches the chunks it receives together. Each chunk is retried (`request_with_retry`):
connection errors, timeouts and 5xx answers move to the next URL with backoff until the retry
budget runs out (`TeacherUnavailableError`); a 4xx is raised at once (`TeacherRequestError`,
the server's reason).

The servers' `/info` is read once, on first use: every URL must serve the same model and
tokenizer, the model must be `expected_model` when one is given, and requests are checked
against the server's limits (`max_top_k`) before they are sent.

Test: `.venv/bin/pytest tests/integration/test_teacher_server.py`.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import httpx
import torch

from opd.arguments import ConfigError
from opd.teacher.consistency import compare_fingerprints, tokenizer_fingerprint
from opd.teacher.http import RetryPolicy, auth_headers, request_with_retry
from opd.teacher.wire import (
    CONTENT_TYPE,
    SERVER_SECONDS_HEADER,
    ScoreRequest,
    SequenceScores,
    WireError,
    candidate_logprobs_with,
    decode_scores,
    encode_request,
    score_batch_with_extras,
)
from opd.types import RolloutBatch, TeacherScores


class ServerTeacher:
    """HTTP client of one or more `opd teacher serve` servers of the same teacher."""

    def __init__(
        self,
        urls: list[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen dataclass: a safe default)
        temperature: float = 1.0,
        batch_size: int = 64,
        expected_model: str | None = None,
    ):
        if not urls:
            raise ConfigError("ServerTeacher needs at least one server URL (teacher_urls).")
        self.urls = [url.rstrip("/") for url in urls]
        self.retry = retry
        self.temperature = temperature
        self.batch_size = batch_size
        self.expected_model = expected_model
        self._http = httpx.Client(timeout=timeout_s, headers=auth_headers(api_key))
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.urls)))
        self._server_info: dict[str, Any] | None = None
        self._calls = itertools.count()  # `next` is atomic under the GIL: threads may call

    @property
    def teacher_id(self) -> str:
        return str(self.server_info()["model"])

    def info(self, url_index: int = 0) -> dict[str, Any]:
        """A fresh `GET /info` of one server (its `stats` change with traffic)."""
        response = request_with_retry(
            self._http, "GET", [self.urls[url_index]], "/info", policy=self.retry
        )
        return response.json()

    def server_info(self) -> dict[str, Any]:
        """The first server's `/info`, read once, after checking that all servers agree."""
        if self._server_info is None:
            infos = [self.info(index) for index in range(len(self.urls))]
            check_same_teacher(infos, self.urls, expected_model=self.expected_model)
            self._server_info = infos[0]
        return self._server_info

    def check_student_tokenizer(self, student_tokenizer) -> None:
        info = self.server_info()
        compare_fingerprints(
            tokenizer_fingerprint(student_tokenizer),
            info["tokenizer"],
            teacher_name=str(info["model"]),
            source=f"{self.urls[0]}/info",
        )

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        return self._score_batch(batch, top_k)[0]

    def _score_batch(
        self, batch: RolloutBatch, top_k: int, **options
    ) -> tuple[TeacherScores, dict[str, torch.Tensor]]:
        """`score_batch_with_extras` over the servers (`options`: what else the request asks
        for), with the HTTP statistics among the scores' metrics."""
        self._check_top_k(top_k)
        stats = {"retries": 0, "server_s": 0.0, "request_bytes": 0, "response_bytes": 0}
        scores, extras = score_batch_with_extras(
            partial(self._score_chunks, http_stats=stats),
            batch,
            top_k=top_k,
            temperature=self.temperature,
            teacher_id=self.teacher_id,
            **options,
        )
        scores.metrics.update({f"teacher/{name}": float(value) for name, value in stats.items()})
        return scores, extras

    def score_sequences(self, request: ScoreRequest) -> SequenceScores:
        """Score a ragged request (its own `top_k` and `temperature`) on the servers."""
        self._check_top_k(request.top_k)
        return self._score_chunks(request)

    def max_candidates(self) -> int:
        """Candidate ids per position the servers score (their `/info`; 0: they cannot)."""
        return int(self.server_info().get("max_candidates", 0))

    def score_candidates(
        self, batch: RolloutBatch, candidate_ids_BTC: torch.Tensor, *, temperature=None
    ) -> torch.Tensor:
        """float32 `[B, T, C]` the teacher's logprobs at `candidate_ids_BTC` (-1 pads; -inf
        there and at masked positions): exact values wherever the teacher ranks the ids."""
        info = self.server_info()
        max_candidates = self.max_candidates()
        width = int(candidate_ids_BTC.shape[-1])
        if not max_candidates:
            raise ConfigError(
                f"the teacher server at {self.urls[0]} ({info.get('backend')} backend, opd "
                f"{info.get('version')}) cannot score candidate sets: serve the teacher with "
                "`opd teacher serve --backend transformers` of this opd version."
            )
        if width > max_candidates:
            raise ConfigError(
                f"{width} candidate ids per position is above the teacher server's "
                f"max_candidates={max_candidates} ({self.urls[0]}/info): lower the top-k the "
                f"method asks for, or restart the server with --max_candidates {width}."
            )
        return candidate_logprobs_with(self, batch, candidate_ids_BTC, temperature=temperature)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> ServerTeacher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_top_k(self, top_k: int) -> None:
        max_top_k = int(self.server_info()["max_top_k"])
        if top_k > max_top_k:
            raise ConfigError(
                f"teacher_top_k={top_k} is above the teacher server's max_top_k={max_top_k} "
                f"({self.urls[0]}/info): lower teacher_top_k, or restart the server with "
                f"`opd teacher serve ... --max_top_k {top_k}`."
            )

    def _score_chunks(
        self, request: ScoreRequest, http_stats: dict[str, float] | None = None
    ) -> SequenceScores:
        """Scores of `request`, sent in chunks of sequences over the URLs.

        `http_stats` (when given) receives retries, bytes each way and the server's own time.
        """
        chunk_size = min(self.batch_size, int(self.server_info()["max_sequences"]))
        chunks = request.chunks(chunk_size)
        # Each call starts one URL further, so small calls (e.g. rows streamed while vLLM
        # generates, `teacher_overlap`) spread over the servers too.
        first = next(self._calls)
        if len(chunks) == 1:  # the common case: no thread hop
            results = [self._post(chunks[0], first, http_stats)]
        else:
            post = partial(self._post, http_stats=http_stats)
            indices = range(first, first + len(chunks))
            results = list(self._pool.map(post, chunks, indices))
        return SequenceScores.concat(results)

    def _post(
        self, chunk: ScoreRequest, index: int, http_stats: dict[str, float] | None = None
    ) -> SequenceScores:
        body = encode_request(chunk)
        response = request_with_retry(
            self._http,
            "POST",
            self.urls,
            "/v1/score",
            policy=self.retry,
            first_url=index % len(self.urls),
            stats=http_stats,
            content=body,
            headers={"Content-Type": CONTENT_TYPE},
        )
        try:
            scores, metadata = decode_scores(response.content)
        except WireError as error:
            raise WireError(
                f"the teacher at {response.url} sent a malformed answer: {error}"
            ) from error
        self._check_answer(chunk, metadata, str(response.url))
        if not torch.equal(scores.completion_lengths_B, chunk.completion_lengths_B):
            raise WireError(
                f"the teacher at {response.url} answered for completion lengths "
                f"{scores.completion_lengths_B.tolist()}, not the requested "
                f"{chunk.completion_lengths_B.tolist()}"
            )
        if http_stats is not None:
            # Chunks run in parallel: the slowest server time is what the caller waited for.
            server_s = float(response.headers.get(SERVER_SECONDS_HEADER, 0.0))
            http_stats["server_s"] = max(http_stats.get("server_s", 0.0), server_s)
            http_stats["request_bytes"] = http_stats.get("request_bytes", 0) + len(body)
            http_stats["response_bytes"] = http_stats.get("response_bytes", 0) + len(
                response.content
            )
        return scores

    def _check_answer(self, chunk: ScoreRequest, metadata: dict[str, str], url: str) -> None:
        """What an answer's metadata must say besides its tensors (the hidden-state client checks
        the output head's hash)."""


def check_same_teacher(
    infos: list[dict[str, Any]], urls: list[str], *, expected_model: str | None
) -> None:
    """Raise ConfigError unless every server serves `expected_model` (when given) with one
    tokenizer: scores from different teachers must not be mixed in one run."""
    from opd.teacher.offline import same_model

    first = infos[0]
    if expected_model and not same_model(expected_model, str(first["model"])):
        raise ConfigError(
            f"the teacher server at {urls[0]} serves {first['model']!r}, but "
            f"teacher_model_name_or_path is {expected_model!r}: point teacher_urls at the right "
            "server, or set teacher_model_name_or_path to the served model."
        )
    for url, info in zip(urls[1:], infos[1:], strict=True):
        for key in ("model", "tokenizer"):
            if info.get(key) != first.get(key):
                raise ConfigError(
                    f"the teacher servers disagree on their {key}: {urls[0]} has "
                    f"{first.get(key)!r}, {url} has {info.get(key)!r}. All teacher_urls must "
                    "serve the same teacher."
                )
