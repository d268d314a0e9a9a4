"""In-process vLLM teacher backend: `opd teacher serve --backend vllm` scores with this.

`VLLMSequenceScorer(model_path).score_sequences(request)` sends every `context + completion` as
one prompt to a `vllm.LLM` with `prompt_logprobs=k` and one throw-away generated token, and
parses the prompt logprobs (`opd.teacher.vllm_parse`). The scores are the same quantity as
`LocalTeacher`'s (the teacher's log-softmax at each completion position, its top k), computed by
vLLM's paged attention instead of a padded transformers forward: equal up to float rounding, not
bit for bit (the kernels sum in another order, which may also change with what vLLM batches
alongside a sequence); tests/integration/test_teacher_vllm.py holds them within 2e-5 in float32.

Limits, all raised as `WireError` so the server answers 4xx:
- temperature 1 only: vLLM computes prompt logprobs from the raw logits for every
  `logprobs_mode` (temperature only touches sampled tokens), and a tempered log-softmax needs the
  full vocabulary's logsumexp, which the top-k does not carry;
- top_k <= `max_top_k` (the engine's `max_logprobs`); a K above the vocabulary is padded;
- a sequence must be shorter than `max_model_len` (vLLM reserves room for one output token).

Test: `pytest tests/integration/test_teacher_vllm.py`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from opd.teacher.vllm_parse import scores_from_request_outputs
from opd.teacher.wire import ScoreRequest, SequenceScores, WireError


class VLLMSequenceScorer:
    """A `vllm.LLM` that scores ragged `ScoreRequest`s (the server's `--backend vllm`)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        max_top_k: int = 128,
        gpu_memory_utilization: float | None = None,
        seed: int = 0,
    ):
        from transformers import AutoTokenizer

        self.teacher_id = str(model_path)
        self.max_top_k = max_top_k
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.llm = build_scoring_llm(
            str(model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            max_logprobs=max_top_k,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_model_len = int(model_config.max_model_len)
        # vLLM rejects a prompt as long as max_model_len: it needs room for one output token.
        self.max_sequence_tokens = self.max_model_len - 1
        # `LLM` is not thread-safe; a server may call from several threads.
        self._lock = threading.Lock()

    def score_sequences(self, request: ScoreRequest) -> SequenceScores:
        """The teacher's logprob of every completion token of `request` (and its top-k)."""
        self._check(request)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM's top-k cannot be wider than the vocabulary; the parser pads the rest.
        num_logprobs = min(request.top_k, self.vocab_size)
        # Flat logprobs: plain lists instead of a Python object per (position, id); no
        # detokenizing either. The one generated token is greedy and thrown away.
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=num_logprobs,
            detokenize=False,
            flat_logprobs=True,
        )
        prompts = [
            TokensPrompt(prompt_token_ids=context + completion)
            for context, completion in zip(request.contexts(), request.completions(), strict=True)
        ]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return scores_from_request_outputs(outputs, request)

    def _check(self, request: ScoreRequest) -> None:
        if request.temperature != 1.0:
            raise WireError(
                f"the vllm backend scores at temperature 1 only; got {request.temperature}. "
                "vLLM's prompt logprobs are of the untempered distribution and a tempered "
                "log-softmax needs the whole vocabulary: serve with --backend transformers, "
                "or set teacher_temperature=1",
                status=422,
            )
        if request.top_k > self.max_top_k:
            raise WireError(
                f"top_k={request.top_k} is above the server's --max-top-k {self.max_top_k}"
            )
        total_B = request.context_lengths_B + request.completion_lengths_B
        if request.num_sequences and int(total_B.max()) > self.max_sequence_tokens:
            row = int(total_B.argmax())
            raise WireError(
                f"sequence {row} has {int(total_B[row])} tokens; the vllm backend scores at most "
                f"max_model_len - 1 = {self.max_sequence_tokens}",
                status=413,
            )


def build_scoring_llm(
    model_path: str,
    *,
    dtype: str,
    max_model_len: int | None,
    max_logprobs: int,
    gpu_memory_utilization: float | None,
    seed: int,
):
    """A `vllm.LLM` for prompt scoring; on CPU configured like the trainer's colocated engine."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        from opd.rollout.cpu_vllm import configure_cpu_vllm_env

        configure_cpu_vllm_env()
    from vllm import LLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return LLM(
        model=model_path,
        seed=seed,
        max_logprobs=max_logprobs,
        # Scoring never samples more than one token: CUDA graphs / torch.compile would only add
        # start-up time on CPU.
        enforce_eager=on_cpu,
        **kwargs,
    )
