"""Teacher costs in one run: server round trip vs in-process forward, wire bytes, offline vs online.

    python scripts/bench_teacher.py                     # all three sections (CPU: ~10 minutes)
    python scripts/bench_teacher.py --only server,wire  # skip the training-step section
    python scripts/bench_teacher.py --only modes        # teacher modes: bytes and exactness

1. **Server overhead.** The same batch (`--sequences` x (`--prompt-tokens` + `--completion-tokens`),
   top-k `--top-k`) scored by `LocalTeacher` in this process and by `ServerTeacher` against
   `opd teacher serve` (a subprocess on loopback, same model, same threads). Median of
   `--repeats`. The model is a Qwen2-shaped random model with a 32k vocabulary (`--hidden`,
   `--layers`), big enough that a forward costs what a small real teacher's does.
2. **Wire bytes.** That batch's request and response in opd's binary format (safetensors) vs the
   same numbers as JSON lists, the usual alternative (e.g. TRL's vllm_serve answers).
3. **Offline vs online step.** The demo pair on the demo task: one `OPDTrainer` step online
   (vLLM rollouts on CPU + an in-process teacher + update) vs offline (Lightning OPD: rollouts
   and teacher scores read from shards written by `opd rollout` + `opd teacher precompute`,
   lp_old recomputed, update). Median step time over `--steps` steps after one warm-up step,
   plus the one-time cost of the rollout and precompute jobs.
4. **Teacher modes.** Request + response bytes per completion token of every way a teacher can
   answer (sampled token, top-k, candidate sets, hidden states in bf16/f32, and full float32
   logits as the reference) at V = 32k / 152k and H = 896 / 4096, encoded by opd's wire format;
   and each mode's per-token reverse KL against the exact one from the in-process teacher, on a
   random 32k-vocabulary pair sharpened to LM-like entropies, the teacher served on loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="server,wire,offline,modes")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--completion-tokens", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per training step")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_model(args, folder: Path) -> Path:
    """A random Qwen2-shaped teacher with a `--vocab` vocabulary (char tokenizer for /info)."""
    from opd.demo.tiny import TinyShape, build_char_tokenizer, build_tiny_model

    max_positions = args.prompt_tokens + args.completion_tokens + 8
    shape = TinyShape(args.hidden, args.layers, args.hidden // 64, args.hidden * 3, max_positions)
    model = build_tiny_model(args.vocab, shape)
    model.save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder


def bench_batch(args):
    from opd.types import RolloutBatch

    generator = torch.Generator().manual_seed(0)
    shape = (args.sequences, args.completion_tokens)
    return RolloutBatch(
        prompt_ids=torch.randint(
            3, args.vocab, (args.sequences, args.prompt_tokens), generator=generator
        ).tolist(),
        completion_ids_BT=torch.randint(3, args.vocab, shape, generator=generator),
        completion_mask_BT=torch.ones(shape, dtype=torch.long),
    )


def start_server(model: Path, port: int, batch_size: int) -> subprocess.Popen:
    import httpx

    command = [
        sys.executable,
        "-m",
        "opd.cli",
        "teacher",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--batch_size",
        str(batch_size),
        "--log_level",
        "warning",
    ]
    server = subprocess.Popen(command)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the teacher server did not start")


def bench_server(args, folder: Path) -> list[tuple[str, str, str]]:
    from opd.teacher.client import ServerTeacher
    from opd.teacher.local import LocalTeacher

    model_path = bench_model(args, folder / "teacher")
    batch = bench_batch(args)
    local = LocalTeacher.from_pretrained(str(model_path), batch_size=args.sequences)
    port = free_port()
    server = start_server(model_path, port, args.sequences)
    client = ServerTeacher([f"http://127.0.0.1:{port}"], batch_size=args.sequences)
    # Alternate the two so that drifts of the machine (CPU clocks under sustained load, other
    # processes) hit both equally; the first round is a warm-up.
    local_times, round_trips, server_times = [], [], []
    try:
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            local_scores = local.score(batch, top_k=args.top_k)
            local_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            server_scores = client.score(batch, top_k=args.top_k)
            round_trips.append(time.perf_counter() - start)
            server_times.append(server_scores.metrics["teacher/server_s"])
    finally:
        client.close()
        server.kill()
    # The round trip minus the server's own time is what HTTP and the wire format cost.
    pairs = zip(round_trips[1:], server_times[1:], strict=True)
    http_s = statistics.median(round_trip - own for round_trip, own in pairs)
    local_s, server_s = statistics.median(local_times[1:]), statistics.median(round_trips[1:])
    max_error = (server_scores.sampled_logprobs_BT - local_scores.sampled_logprobs_BT).abs().max()
    tokens = args.sequences * (args.prompt_tokens + args.completion_tokens)
    return [
        ("in-process forward (LocalTeacher)", f"{local_s * 1e3:.0f} ms", f"{tokens} tokens"),
        (
            "server round trip (ServerTeacher)",
            f"{server_s * 1e3:.0f} ms",
            f"overhead {100 * (server_s / local_s - 1):+.1f}% (target <= 5%)",
        ),
        (
            "  of which HTTP + wire format",
            f"{http_s * 1e3:.1f} ms",
            f"{100 * http_s / local_s:.2f}% of the forward",
        ),
        ("max |server - local| logprob", f"{float(max_error):.1e}", "same model, fp32"),
    ]


def bench_wire(args) -> list[tuple[str, str, str]]:
    from opd.teacher.wire import (
        SequenceScores,
        encode_request,
        encode_scores,
        request_from_batch,
    )

    batch = bench_batch(args)
    request, _ = request_from_batch(batch, top_k=args.top_k)
    tokens = int(request.completion_lengths_B.sum())
    generator = torch.Generator().manual_seed(1)
    scores = SequenceScores(
        completion_lengths_B=request.completion_lengths_B,
        sampled_logprobs_M=-torch.rand(tokens, generator=generator) * 10,
        topk_ids_MK=torch.randint(0, args.vocab, (tokens, args.top_k), generator=generator),
        topk_logprobs_MK=-torch.rand(tokens, args.top_k, generator=generator).sort(1).values * 10,
    )
    binary_request, binary_response = len(encode_request(request)), len(encode_scores(scores))
    json_request = len(
        json.dumps(
            {
                "contexts": request.contexts(),
                "completions": request.completions(),
                "top_k": args.top_k,
            }
        )
    )
    json_response = len(json.dumps(json_scores(scores)))
    openai_response = len(json.dumps(openai_prompt_logprobs(scores)))
    return [
        (
            "request: binary vs JSON lists",
            f"{binary_request:,} B vs {json_request:,} B",
            f"{json_request / binary_request:.1f}x smaller",
        ),
        (
            "response: binary vs JSON lists",
            f"{binary_response:,} B vs {json_response:,} B",
            f"{json_response / binary_response:.1f}x smaller",
        ),
        (
            "response: binary vs vLLM OpenAI JSON",
            f"{binary_response:,} B vs {openai_response:,} B",
            f"{openai_response / binary_response:.1f}x smaller (target >= 10x)",
        ),
    ]


# ------------------------------------------------------------------------------------------------
# 4. Teacher modes: bytes per token on the wire, and exactness against the in-process teacher
# ------------------------------------------------------------------------------------------------

MODE_SHAPES = ((32000, 896), (32000, 4096), (151936, 896), (151936, 4096))
MODE_TOKENS = 8 * 64  # 8 sequences of 64 completion tokens after 64 context tokens


def mode_payloads(vocab: int, hidden: int) -> dict[str, tuple[object, dict]]:
    """Per mode: the request, and the response's per-token tensors (random values, real
    dtypes and shapes). Union candidates: the student's and the teacher's top-20, at most 40."""
    from opd.teacher.wire import HIDDEN_DTYPES, make_request

    contexts = [[5] * 64 for _ in range(8)]
    completions = [[7] * 64 for _ in range(8)]
    plain = make_request(contexts, completions)
    m = MODE_TOKENS
    sampled = {"sampled_logprobs_M": torch.zeros(m)}

    def topk(k):
        ids = torch.zeros(m, k, dtype=torch.int32)
        return {**sampled, "topk_ids_MK": ids, "topk_logprobs_MK": torch.zeros(m, k)}

    def candidates(c):
        request = dataclasses.replace(plain, candidate_ids_MC=torch.zeros(m, c, dtype=torch.long))
        return request, {**sampled, "candidate_logprobs_MC": torch.zeros(m, c)}

    def hidden_states(dtype):
        request = dataclasses.replace(plain, hidden_dtype=dtype)
        values = torch.zeros(m, hidden, dtype=HIDDEN_DTYPES[dtype])
        return request, {**sampled, "hidden_MH": values}

    return {
        "sampled token only": (plain, sampled),
        "top-k, K = 20": (plain, topk(20)),
        "top-k, K = 64": (plain, topk(64)),
        "candidate set, C = 20 (student top-k)": candidates(20),
        "candidate set, C = 40 (union of top-20s)": candidates(40),
        "hidden states, bfloat16": hidden_states("bfloat16"),
        "hidden states, float32": hidden_states("float32"),
        "full logits, float32 (reference)": (plain, {"logits": torch.zeros(m, vocab)}),
    }


def mode_bytes_per_token(vocab: int, hidden: int) -> dict[str, float]:
    """Request + response bytes per completion token of each mode, as encoded."""
    from safetensors.torch import save as safetensors_save

    from opd.teacher.wire import SequenceScores, encode_request, encode_scores

    result = {}
    for name, (request, tensors) in mode_payloads(vocab, hidden).items():
        if "logits" in tensors:  # no opd mode sends these: the reference
            response = safetensors_save(tensors)
        else:
            response = encode_scores(SequenceScores(request.completion_lengths_B, **tensors))
        result[name] = (len(encode_request(request)) + len(response)) / MODE_TOKENS
    return result


def sharpened_model(vocab: int, shape, seed: int, target_entropy: float, batch):
    """A random Qwen2 whose final norm is scaled until its mean next-token entropy on `batch` is
    at most `target_entropy` nats: random weights alone give near-uniform distributions (10 nats
    at 32k), on which a top-k holds almost no mass and every approximation would look worse than
    on a real LM. (Scaling the tied head instead also scales the input embeddings, and the
    distributions collapse onto one token at once.)"""
    from opd.demo.tiny import build_tiny_model
    from opd.teacher.local import LocalTeacher

    model = build_tiny_model(vocab, shape, seed=seed)
    while True:
        teacher = LocalTeacher(model)
        logits = teacher.completion_hidden_states(batch) @ teacher.output_weight.T
        logprobs = logits.log_softmax(-1)
        entropy = float(-(logprobs.exp() * logprobs).sum(-1).mean())
        if entropy <= target_entropy:
            return model, entropy
        with torch.no_grad():
            model.model.norm.weight.mul_(1.05)


def mode_errors(args) -> dict[str, str]:
    """|per-token reverse KL(student || teacher) from each mode - the exact one from the
    in-process teacher's logits| (max and mean) for a sharpened random teacher (V = 32k, H = 896)
    served on loopback by `opd teacher serve`'s app, and student logits near the teacher's."""
    import uvicorn

    from opd.demo.tiny import TinyShape
    from opd.kernels import full_divergence, topk_divergence
    from opd.teacher.client import ServerTeacher
    from opd.teacher.hidden_client import HiddenStateServerTeacher
    from opd.teacher.local import LocalTeacher
    from opd.teacher.output_head import HeadCache
    from opd.teacher.server import create_app
    from opd.teacher.wire import RequestLimits
    from opd.types import RolloutBatch

    vocab = 32000
    generator = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (8, 32), generator=generator).tolist(),
        completion_ids_BT=torch.randint(3, vocab, (8, 32), generator=generator),
        completion_mask_BT=torch.ones(8, 32, dtype=torch.long),
    )
    teacher_model, teacher_entropy = sharpened_model(
        vocab, TinyShape(896, 2, 14, 2688, 128), 1, 1.5, batch
    )
    local = LocalTeacher(teacher_model)
    keep = batch.completion_mask_BT.bool()
    teacher_NV = (local.completion_hidden_states(batch) @ local.output_weight.T)[keep]
    # A student near its teacher, as in distillation: flatter, and noisy (per-token KL ~ 1 nat).
    noise_NV = torch.randn(teacher_NV.shape, generator=generator)
    student_NV = 0.8 * teacher_NV + 0.7 * noise_NV
    exact_N = full_divergence(student_NV, teacher_NV, kind="reverse_kl")
    app = create_app(
        local, model_name="bench", limits=RequestLimits(vocab_size=vocab, max_top_k=64),
        api_key=None, max_batch_tokens=65536, max_body_bytes=1 << 28, pads_batches=True,
        backend_name="transformers",
    )  # fmt: skip
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{config.port}"

    def error(values_N) -> str:
        error_N = (values_N - exact_N).abs()
        return f"err max {float(error_N.max()):.1e}, mean {float(error_N.mean()):.1e}"

    errors = {}
    try:
        client = ServerTeacher([url])
        scores = client.score(batch, top_k=64)
        sampled_err = (scores.sampled_logprobs_BT - local.score(batch).sampled_logprobs_BT).abs()
        errors["sampled token only"] = f"logprob exact (err {float(sampled_err.max()):.0e}); no KL"
        for k in (20, 64):
            ids, logprobs = scores.topk_ids_BTK[keep][:, :k], scores.topk_logprobs_BTK[keep][:, :k]
            errors[f"top-k, K = {k}"] = error(topk_divergence(student_NV, ids, logprobs))
        student_ids = student_NV.topk(20, -1).indices
        union = torch.cat([student_ids, scores.topk_ids_BTK[keep][:, :20]], -1)
        union = torch.where(first_occurrence(union), union, -1)
        for name, ids_NC in (("C = 20 (student top-k)", student_ids), ("C = 40", union)):
            candidates_BTC = torch.full((*keep.shape, ids_NC.shape[1]), -1)
            candidates_BTC[keep] = ids_NC
            at_ids = client.score_candidates(batch, candidates_BTC)[keep]
            kl = topk_divergence(student_NV, ids_NC.clamp(min=0), at_ids)
            key = next(key for key in mode_payloads(8, 8) if name.split(" (")[0] in key)
            errors[key] = error(kl)
        for dtype in ("bfloat16", "float32"):
            hidden = HiddenStateServerTeacher([url], hidden_dtype=dtype, head_cache=HeadCache(
                tempfile.mkdtemp()))  # fmt: skip
            hidden.score(batch)
            teacher_hidden_NH = hidden.completion_hidden_states(batch)[keep]
            kl = full_divergence(student_NV, teacher_hidden_NH @ hidden.output_weight.T)
            errors[f"hidden states, {dtype}"] = error(kl)
        errors["full logits, float32 (reference)"] = "the exact values"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    mean_kl = float(exact_N.mean())
    errors["note"] = f"teacher entropy {teacher_entropy:.2f} nats, mean exact KL {mean_kl:.2f}"
    return errors


def first_occurrence(ids_NC: torch.Tensor) -> torch.Tensor:
    """True where an id appears for the first time in its row (the union's deduplication)."""
    equal = ids_NC[:, :, None] == ids_NC[:, None, :]
    earlier = torch.ones(ids_NC.shape[1], ids_NC.shape[1], dtype=torch.bool).tril(-1)
    return ~(equal & earlier).any(-1)


def bench_modes(args) -> None:
    """Prints its own table: bytes per token for every teacher mode and shape, and exactness."""
    per_shape = {shape: mode_bytes_per_token(*shape) for shape in MODE_SHAPES}
    errors = mode_errors(args)
    names = list(per_shape[MODE_SHAPES[0]])
    header = ["mode (request + response bytes per token)"]
    header += [f"V={round(v / 1000)}k H={h}" for v, h in MODE_SHAPES]
    header += ["vs full logits (152k)", "exactness vs local (V=32k, H=896)"]
    rows = [header]
    for name in names:
        values = [per_shape[shape][name] for shape in MODE_SHAPES]
        reference = per_shape[(151936, 896)]["full logits, float32 (reference)"]
        ratio = reference / per_shape[(151936, 896)][name]
        less = f"{ratio:,.0f}x less" if ratio > 1 else "1x"
        rows.append([name, *(f"{v:,.0f}" for v in values), less, errors[name]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print("\n| " + " | ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    for vocab, hidden in ((151936, 896), (151936, 4096)):
        print(f"output head, once per run (float32): {vocab * hidden * 4 / 1e6:,.0f} MB at "
              f"V={vocab}, H={hidden}")  # fmt: skip
    print(f"exactness: {errors['note']}; top-k and candidate sets add a tail bucket")


def json_scores(scores) -> list[dict]:
    """The same scores the way a JSON API sends them: per sequence, per token, lists of floats."""
    out, offset = [], 0
    for length in scores.completion_lengths_B.tolist():
        rows = slice(offset, offset + length)
        out.append(
            {
                "logprobs": scores.sampled_logprobs_M[rows].tolist(),
                "top_logprobs": [
                    dict(zip(map(str, ids), values, strict=True))
                    for ids, values in zip(
                        scores.topk_ids_MK[rows].tolist(),
                        scores.topk_logprobs_MK[rows].tolist(),
                        strict=True,
                    )
                ],
            }
        )
        offset += length
    return out


def openai_prompt_logprobs(scores) -> list[list[dict]]:
    """The same scores as a stock vLLM server's `prompt_logprobs` (what `teacher_mode: vllm`
    receives): per position, token id -> {logprob, rank, decoded_token}."""
    out, offset = [], 0
    for length in scores.completion_lengths_B.tolist():
        positions = []
        for m in range(offset, offset + length):
            ids, values = scores.topk_ids_MK[m].tolist(), scores.topk_logprobs_MK[m].tolist()
            entry = {
                str(i): {"logprob": v, "rank": r + 1, "decoded_token": " tok"}
                for r, (i, v) in enumerate(zip(ids, values, strict=True))
            }
            positions.append(entry)
        out.append(positions)
        offset += length
    return out


def run_opd(*argv: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opd.cli", *argv], capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"opd {' '.join(argv[:2])} failed:\n{result.stderr[-3000:]}")


def bench_offline(args, folder: Path) -> list[tuple[str, str, str]]:
    from opd.demo.pretrain import demo_splits, prepare_demo_models

    teacher, student = prepare_demo_models()
    prompts = folder / "prompts.jsonl"
    train = demo_splits()[0].select(range(args.prompts * (args.steps + 1)))
    train.to_json(prompts)
    generations = 4
    rollouts, scores = folder / "rollouts", folder / "scores"
    # Flags shared by the one-time jobs and the timed runs (the same rollout shape, one teacher).
    shape = ["--num_generations", str(generations), "--max_completion_length", "4",
             "--vllm_max_model_length", "32"]  # fmt: skip
    local_teacher = ["--teacher_mode", "local", "--teacher_model_name_or_path", str(teacher)]
    start = time.perf_counter()
    run_opd("rollout", "--model_name_or_path", str(student), "--dataset_name", str(prompts),
            "--output_dir", str(rollouts), *shape)  # fmt: skip
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    run_opd("teacher", "precompute", "--rollouts", str(rollouts), "--output_dir", str(scores),
            *local_teacher, "--teacher_batch_size", "512")  # fmt: skip
    precompute_s = time.perf_counter() - start
    common = [
        "--model_name_or_path", str(student), "--max_steps", str(args.steps + 1),
        "--per_device_train_batch_size", str(args.prompts * generations), *shape,
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--eval_before_after", "false", "--teacher_batch_size", "512",
    ]  # fmt: skip
    online = step_seconds(
        folder / "online",
        [*common, *local_teacher, "--dataset_name", str(prompts), "--use_vllm", "true"],
    )
    offline = step_seconds(
        folder / "offline", [*common, "--teacher_mode", "offline", "--teacher_shards", str(scores)]
    )
    return [
        (
            "online step (vLLM rollout + teacher + update)",
            f"{online * 1e3:.0f} ms",
            f"{args.prompts} prompts x {generations}",
        ),
        (
            "offline step (shards + lp_old + update)",
            f"{offline * 1e3:.0f} ms",
            f"{online / offline:.1f}x faster per step",
        ),
        (
            "one-time: opd rollout + opd teacher precompute",
            f"{rollout_s:.0f} s + {precompute_s:.0f} s",
            "CLI wall time, incl. start-up",
        ),
    ]


def step_seconds(output_dir: Path, argv: list[str]) -> float:
    """Median seconds per optimizer step after the first, from TRL's per-step `step_time`."""
    run_opd("distill", *argv, "--output_dir", str(output_dir))
    history = json.loads((output_dir / "opd_results.json").read_text())["log_history"]
    times = [entry["step_time"] for entry in history if "step_time" in entry][1:]
    return statistics.median(times)


def print_table(rows: list[tuple[str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    args = parse_args()
    sections = set(args.only.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[tuple[str, str, str]] = [("measurement", "value", "note")]
    with tempfile.TemporaryDirectory() as folder:
        if "server" in sections:
            rows += bench_server(args, Path(folder))
        if "wire" in sections:
            rows += bench_wire(args)
        if "offline" in sections:
            rows += bench_offline(args, Path(folder))
    if len(rows) > 1:
        print_table(rows)
    if "modes" in sections:
        bench_modes(args)


if __name__ == "__main__":
    main()
