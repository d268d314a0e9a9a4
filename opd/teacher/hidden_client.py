"""`HiddenStateServerTeacher`: a served teacher whose full distribution the trainer can use.

A `ServerTeacher` that also asks for the teacher's final hidden state at every completion
position and holds the teacher's output head (fetched once, cached by sha256:
`opd.teacher.output_head`), so it is a `FullDistributionTeacher`: the fused kernels compute the
exact full-vocabulary quantities (`opd_divergence_support: full`, `opd_baseline: full`, exact
reverse-KL metrics) from `hidden @ head.T` and never receive `[tokens x vocab]` logits.

Traffic per token is H values instead of V logits (H = 896 against V = 151,936 for a Qwen2.5
0.5B teacher, `scripts/bench_teacher.py`). One request per batch gives everything: `score`
asks for the sampled logprobs, the top-k and the hidden states together and keeps the hidden
states for the `completion_hidden_states` call of the same batch that follows it.

Every answer names the head its hidden states belong to; an answer naming another head than the
one this run holds (the server was restarted with another model) is refused.

Test: `pytest tests/integration/test_teacher_hidden.py`.
"""

from __future__ import annotations

import torch

from opd.arguments import ConfigError
from opd.teacher.client import ServerTeacher
from opd.teacher.http import request_with_retry
from opd.teacher.output_head import HEAD_HASH_KEY, HeadCache, decode_head
from opd.teacher.wire import HIDDEN_DTYPES, ScoreRequest
from opd.types import RolloutBatch, TeacherScores


class HiddenStateServerTeacher(ServerTeacher):
    """`ServerTeacher` in hidden-state mode (`hidden_dtype`: float32 or bfloat16 on the wire)."""

    def __init__(
        self,
        urls: list[str],
        *,
        hidden_dtype: str = "float32",
        head_cache: HeadCache | None = None,
        device: str | torch.device = "cpu",
        **kwargs,
    ):
        """`device`: where the trainer computes with the head (the student's device)."""
        super().__init__(urls, **kwargs)
        self.device = torch.device(device)
        if hidden_dtype not in HIDDEN_DTYPES:
            raise ConfigError(
                f"teacher_hidden_dtype={hidden_dtype!r} is not one of {list(HIDDEN_DTYPES)}."
            )
        self.hidden_dtype = hidden_dtype
        self.head_cache = head_cache or HeadCache()
        self._head_VH: torch.Tensor | None = None
        self._last: tuple[RolloutBatch, torch.Tensor] | None = None

    def hidden_info(self) -> dict:
        """The server's `/info["hidden_states"]`; a ConfigError when it serves none."""
        info = self.server_info()
        hidden = info.get("hidden_states")
        if not hidden:
            raise ConfigError(
                f"the teacher server at {self.urls[0]} ({info.get('backend')} backend) does not "
                "return hidden states, which the full teacher distribution needs over HTTP: "
                "serve it with `opd teacher serve --backend transformers`, or use the top-k "
                "forms (opd_divergence_support: topk, opd_baseline: topk)."
            )
        return hidden

    @property
    def output_weight(self) -> torch.Tensor:
        """The teacher's lm_head `[V, H]`: from the cache when its hash is there, else fetched
        once from `GET /v1/output_head` and checked against `/info`."""
        if self._head_VH is None:
            expected = self.hidden_info()["output_head"]
            head_VH = self.head_cache.load(expected)
            if head_VH is None:
                response = request_with_retry(
                    self._http, "GET", self.urls, "/v1/output_head", policy=self.retry
                )
                head_VH = decode_head(response.content, expected, source=str(response.url))
                self.head_cache.store(response.content, expected["sha256"])
            self._head_VH = head_VH.to(self.device)
        return self._head_VH

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        hidden_size = int(self.hidden_info()["hidden_size"])
        scores, extras = self._score_batch(
            batch, top_k, hidden_dtype=self.hidden_dtype, hidden_size=hidden_size
        )
        self._last = (batch, extras["hidden_BTH"])
        return scores

    @torch.no_grad()
    def completion_hidden_states(self, batch: RolloutBatch) -> torch.Tensor:
        """`[B, T, H]` the teacher's final hidden states (0 where masked), in the head's dtype:
        those of the last `score(batch)` call for this very batch, else from a new request.
        They are handed over, not kept: `[B, T, H]` is large."""
        if self._last is None or self._last[0] is not batch:
            self.score(batch, top_k=0)
        assert self._last is not None
        hidden_BTH, self._last = self._last[1], None
        return hidden_BTH.to(self.device, self.output_weight.dtype)

    def _check_answer(self, chunk: ScoreRequest, metadata: dict[str, str], url: str) -> None:
        if not chunk.hidden_dtype:
            return
        expected = self.hidden_info()["output_head"]["sha256"]
        if metadata.get(HEAD_HASH_KEY) != expected:
            raise ConfigError(
                f"the teacher at {url} answered with hidden states of the output head "
                f"{metadata.get(HEAD_HASH_KEY)!r}, but this run uses the head {expected!r} "
                "(its /info at start): the server was restarted with another model. Point "
                "teacher_urls at the original teacher, or restart the run."
            )
