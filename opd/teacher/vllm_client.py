"""`VLLMTeacher`: a `TeacherScorer` client of any stock `vllm serve` OpenAI server.

    vllm serve Qwen/Qwen3-8B --max-logprobs 128        # the teacher, on its own GPUs
    opd distill --teacher_mode vllm --teacher_urls http://host:8000 --teacher_top_k 64 ...

Each sequence `teacher context + completion` is sent as a token-id prompt to `/v1/completions`
with `prompt_logprobs=k` and `max_tokens=1`: vLLM answers with the teacher's logprob of every
prompt token and its top-k, and `opd.teacher.vllm_parse` keeps the completion positions. Requests
carry `batch_size` sequences each; chunk i starts at URL `i % len(urls)` and chunks run
concurrently, so several replicas share the load (retries rotate over them, `opd.teacher.http`).

What a stock server cannot do:
- temperature != 1: prompt logprobs are of the untempered distribution (construction fails);
- top_k above its `--max-logprobs` (default 20): the server answers 400, raised with a hint;
- report its tokenizer: `check_student_tokenizer` probes `/tokenize` with a fixed text and a
  short chat instead, and compares the ids with the student tokenizer's.

Test: `pytest tests/integration/test_teacher_vllm.py`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from opd.arguments import ConfigError
from opd.teacher.http import (
    RetryPolicy,
    TeacherRequestError,
    auth_headers,
    request_with_retry,
)
from opd.teacher.vllm_parse import scores_from_completion_response, vocab_size_from_error
from opd.teacher.wire import ScoreRequest, SequenceScores, score_batch_with
from opd.types import RolloutBatch, TeacherScores

# Letters, digits, spaces, punctuation, a newline and a tab, and non-ASCII (accents, CJK, an
# emoji): tokenizers that differ anywhere common usually differ here.
PROBE_TEXT = (
    "The quick brown fox, 42 times: jumps over 3.14159 lazy dogs! (ok?) #1 -> [x=y]\n"
    "\tnaïve café Ωμέγα 日本語 🙂 end."
)
PROBE_CHAT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And times 2?"},
]
MAX_SHOWN_IDS = 48
SERVER = "vllm serve"  # what runs the server: named when it stays unreachable


class VLLMTeacher:
    """Scores rollouts with a stock vLLM OpenAI server's `prompt_logprobs`.

    Construction asks the server only when `model` is None (the first id of `/v1/models`);
    `check_student_tokenizer` checks that `model` is served and tokenizes like the student.
    """

    def __init__(
        self,
        urls: list[str] | str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen dataclass, safe to share)
        temperature: float = 1.0,
        batch_size: int = 64,
    ):
        if temperature != 1.0:
            raise ConfigError(
                f"teacher_mode=vllm scores at temperature 1 only (got teacher_temperature="
                f"{temperature}): vLLM's prompt_logprobs are of the untempered distribution. "
                "Use teacher_temperature=1, or `opd teacher serve --backend transformers` with "
                "teacher_mode=server."
            )
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ConfigError("teacher_mode=vllm needs at least one URL in teacher_urls")
        self.retry = retry
        self.temperature = 1.0
        self.batch_size = batch_size
        self.client = httpx.Client(timeout=timeout_s, headers=auth_headers(api_key))
        self.pool = ThreadPoolExecutor(max_workers=min(8, 2 * len(self.urls)))
        self.max_model_len: int | None = None
        # The teacher's logits width, asked of the server before the first top-k request
        # (0: the server did not say).
        self.vocab_size: int | None = None
        self.model = model if model is not None else self._served_models()[0]["id"]
        self.teacher_id = self.model

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        return score_batch_with(self, batch, top_k=top_k)

    def score_sequences(self, request: ScoreRequest) -> SequenceScores:
        """Score `request` in chunks of `batch_size` sequences, spread over the URLs."""
        if request.top_k and self.vocab_size is None:
            self.vocab_size = self._probe_vocab_size() or 0
        chunks = request.chunks(self.batch_size)
        futures = [
            self.pool.submit(self._score_chunk, chunk, i % len(self.urls))
            for i, chunk in enumerate(chunks)
        ]
        return SequenceScores.concat([future.result() for future in futures])

    def _score_chunk(self, request: ScoreRequest, first_url: int) -> SequenceScores:
        payload = {
            "model": self.model,
            "prompt": [
                context + completion
                for context, completion in zip(
                    request.contexts(), request.completions(), strict=True
                )
            ],
            # One generated token is the least vLLM accepts; greedy, since it is thrown away.
            "max_tokens": 1,
            "temperature": 0.0,
            # The actual prompt token always comes with its logprob, so 0 is enough for k = 0.
            # More than the vocabulary would kill the server's engine; the parser pads instead.
            "prompt_logprobs": min(request.top_k, self.vocab_size or request.top_k),
        }
        try:
            response = self._post("/v1/completions", payload, first_url=first_url)
        except TeacherRequestError as error:
            if request.top_k and "logprobs" in str(error):
                raise TeacherRequestError(
                    f"{error}. To serve teacher_top_k={request.top_k}, start vllm with "
                    f"--max-logprobs {request.top_k} (or more)."
                ) from error
            raise
        return scores_from_completion_response(response.json(), request)

    # --------------------------------------------------------------------------------------------
    # Start-up checks
    # --------------------------------------------------------------------------------------------

    def check_student_tokenizer(self, student_tokenizer) -> None:
        """Raise ConfigError naming every probe that the server tokenizes unlike the student.

        A stock server exposes no tokenizer hash, so compare behaviour: the ids of `PROBE_TEXT`,
        of the student's special tokens, and of `PROBE_CHAT` through the chat template.
        """
        served = {card["id"] for card in self._served_models()}
        if self.model not in served:
            raise ConfigError(
                f"the vLLM server at {self.urls[0]} serves {sorted(served)}, not {self.model!r}; "
                "set teacher_model_name_or_path to the served name (or start vllm with "
                f"--served-model-name {self.model})"
            )
        differences = []
        special_tokens = "".join(student_tokenizer.all_special_tokens)
        for what, text in (("probe text", PROBE_TEXT), ("special tokens", special_tokens)):
            if not text:
                continue
            student_ids = student_tokenizer.encode(text, add_special_tokens=False)
            teacher_ids = self._tokenize({"prompt": text, "add_special_tokens": False})
            differences += compare_ids(what, student_ids, teacher_ids)
        differences += self._chat_differences(student_tokenizer)
        if differences:
            raise ConfigError(
                f"The vLLM teacher {self.model!r} at {self.urls[0]} does not tokenize like the "
                "student (" + "; ".join(differences) + "). OPD compares logprobs of the same "
                "token ids, so both models must use the same tokenizer and chat template: pick a "
                "teacher from the student's family (or pass vllm the student's --chat-template), "
                "or set teacher_cross_tokenizer: true to align the two tokenizers by text."
            )

    def probe_chat_ids(self) -> list[int] | None:
        """The server's ids of `PROBE_CHAT` through its chat template; None when it has none."""
        try:
            return self._tokenize(
                {"messages": PROBE_CHAT, "add_generation_prompt": True, "add_special_tokens": False}
            )
        except TeacherRequestError as error:
            if "chat template" not in str(error).lower():
                raise
            return None

    def _chat_differences(self, student_tokenizer) -> list[str]:
        student_has_template = bool(getattr(student_tokenizer, "chat_template", None))
        teacher_ids = self.probe_chat_ids()
        if teacher_ids is None:
            return (
                ["the teacher server has no chat template but the student's tokenizer has one"]
                if student_has_template
                else []
            )
        if not student_has_template:
            return [
                "the teacher server applies a chat template but the student's tokenizer has none"
            ]
        student_ids = student_tokenizer.apply_chat_template(
            PROBE_CHAT, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return compare_ids("chat template", list(student_ids), teacher_ids)

    def _probe_vocab_size(self) -> int | None:
        """Ask for a bias on an id no vocabulary has: the server's 400 names its vocabulary size.

        None when the answer does not say (the request is then sent with k unclamped).
        """
        payload = {
            "model": self.model,
            "prompt": [[0]],
            "max_tokens": 1,
            "logit_bias": {str(2**31 - 1): 0.0},
        }
        try:
            self._post("/v1/completions", payload)
        except TeacherRequestError as error:
            return vocab_size_from_error(str(error))
        return None

    def _tokenize(self, body: dict[str, Any]) -> list[int]:
        response = self._post("/tokenize", {"model": self.model, **body})
        return [int(i) for i in response.json()["tokens"]]

    def _served_models(self) -> list[dict[str, Any]]:
        response = request_with_retry(
            self.client, "GET", self.urls, "/v1/models", policy=self.retry, server=SERVER
        )
        cards = response.json().get("data") or []
        if not cards:
            raise ConfigError(f"the vLLM server at {self.urls[0]} lists no models at /v1/models")
        self.max_model_len = cards[0].get("max_model_len")
        return cards

    def _post(self, path: str, payload: dict[str, Any], *, first_url: int = 0) -> httpx.Response:
        return request_with_retry(
            self.client,
            "POST",
            self.urls,
            path,
            policy=self.retry,
            first_url=first_url,
            server=SERVER,
            json=payload,
        )


def compare_ids(what: str, student_ids: list[int], teacher_ids: list[int]) -> list[str]:
    """`[]` when equal, else one line naming the first differing token and both id lists."""
    if student_ids == teacher_ids:
        return []
    first = next(
        (i for i, (s, t) in enumerate(zip(student_ids, teacher_ids, strict=False)) if s != t),
        min(len(student_ids), len(teacher_ids)),
    )
    return [
        f"{what} tokenizes differently (first difference at token {first}): "
        f"student {_shown(student_ids)} vs teacher {_shown(teacher_ids)}"
    ]


def _shown(ids: list[int]) -> str:
    return str(ids) if len(ids) <= MAX_SHOWN_IDS else f"{ids[:MAX_SHOWN_IDS]}... ({len(ids)} ids)"
