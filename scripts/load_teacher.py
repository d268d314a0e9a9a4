"""Load test of the teacher server: N concurrent clients for D seconds on loopback.

    .venv/bin/python scripts/load_teacher.py                 # a server on the demo teacher
    .venv/bin/python scripts/load_teacher.py --url http://127.0.0.1:8000 --api-key KEY
    .venv/bin/python scripts/load_teacher.py --model PATH --clients 64 --duration 30

Without `--url` it starts `opd teacher serve --model M` in a subprocess (M: `--model`, default the
demo teacher of `opd.demo.pretrain.prepare_demo_models`, trained and cached on first use) and
stops it at the end. Each client (an asyncio task with its own connection) sends one request at a
time: `--sequences` sequences of random ids below the teacher's vocabulary, with context and
completion lengths drawn uniformly from `--prompt-tokens` and `--completion-tokens`, asking for
`--top-k`. Every answer is decoded and checked (HTTP 200, one score per completion token).

Prints one table row: clients, duration, requests, requests/s, tokens/s (context + completion
tokens scored), p50/p99 latency in ms, errors; plus the server's batching (requests per batch).
Exits 1 if any request failed.

Mixed mode, `--hostile-clients N`: N more clients send only malformed requests (truncated or
random bodies, a header with an exotic dtype, ids outside the vocabulary, lengths that do not add
up, a top-k above the server's limit, a temperature that would overflow, a trailing-slash path)
as fast as they are answered. Each must get a 4xx; a 5xx, a 200 or a dropped connection counts as
an error of that row. The good clients' row then shows what the hostile traffic costs them:

    .venv/bin/python scripts/load_teacher.py --clients 16 --hostile-clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from opd.teacher.http import auth_headers
from opd.teacher.wire import CONTENT_TYPE, decode_scores, encode_request, make_request

NUM_DISTINCT_BODIES = 256  # built before the clock starts, so the clients spend no CPU on them


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server; default: start one on --model")
    parser.add_argument("--model", help="model for the started server (default: demo teacher)")
    parser.add_argument("--api-key", help="bearer token (default: $OPD_TEACHER_API_KEY)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--hostile-clients", type=int, default=0, help="more clients sending malformed requests"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per request")
    parser.add_argument("--top-k", type=int, default=16)
    # Both ranges shrink together when the longest sequence would pass the server's limit.
    parser.add_argument("--prompt-tokens", default="16:128", help="min:max context length")
    parser.add_argument("--completion-tokens", default="16:256", help="min:max completion length")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def token_range(text: str) -> tuple[int, int]:
    low, high = (int(part) for part in text.split(":"))
    assert 1 <= low <= high, f"bad length range {text!r}: want min:max with 1 <= min <= max"
    return low, high


def fit_lengths(
    prompt_range: tuple[int, int], completion_range: tuple[int, int], max_sequence_tokens: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Both ranges scaled down together so the longest sequence fits the server's limit (its
    teacher's context: 128 tokens for the demo teacher)."""
    longest = prompt_range[1] + completion_range[1]
    if longest <= max_sequence_tokens:
        return prompt_range, completion_range
    scale = max_sequence_tokens / longest

    def scaled(low: int, high: int) -> tuple[int, int]:
        return max(1, int(low * scale)), max(1, int(high * scale))

    return scaled(*prompt_range), scaled(*completion_range)


def build_bodies(
    args: argparse.Namespace, vocab_size: int, max_sequence_tokens: int
) -> list[tuple[bytes, int, int]]:
    """Request bodies with their token count and completion-token count."""
    rng = random.Random(args.seed)
    prompt_range, completion_range = fit_lengths(
        token_range(args.prompt_tokens), token_range(args.completion_tokens), max_sequence_tokens
    )
    print(f"context {prompt_range[0]}-{prompt_range[1]} + completion "
          f"{completion_range[0]}-{completion_range[1]} tokens per sequence")  # fmt: skip

    def ids(length_range: tuple[int, int]) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(rng.randint(*length_range))]

    bodies = []
    for _ in range(NUM_DISTINCT_BODIES):
        contexts = [ids(prompt_range) for _ in range(args.sequences)]
        completions = [ids(completion_range) for _ in range(args.sequences)]
        request = make_request(contexts, completions, top_k=args.top_k)
        bodies.append(
            (encode_request(request), request.num_tokens, request.completion_ids_M.numel())
        )
    return bodies


def hostile_bodies(good: bytes, vocab_size: int, max_top_k: int) -> list[tuple[str, str, bytes]]:
    """(name, path, body) of requests the server must refuse with a 4xx."""
    rng = random.Random(1)

    def request(**overrides) -> bytes:
        fields = {"contexts": [[1, 2]], "completions": [[3, 4]], "top_k": 0, "temperature": 1.0}
        fields.update(overrides)
        return encode_request(
            make_request(fields.pop("contexts"), fields.pop("completions"), **fields)
        )

    # A header that declares a dtype no request may use (FP8 with an 8-bit exponent, 1 byte each).
    exotic = {name: {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [2 * i, 2 * i + 2]}
              for i, name in enumerate(("context_ids", "context_lengths", "completion_ids",
                                        "completion_lengths"))}  # fmt: skip
    header = json.dumps(exotic).encode()
    exotic_body = len(header).to_bytes(8, "little") + header + bytes(8)
    mismatched = bytearray(request())
    return [
        ("truncated", "/v1/score", good[: len(good) // 2]),
        ("random bytes", "/v1/score", rng.randbytes(512)),
        ("empty", "/v1/score", b""),
        ("exotic dtype", "/v1/score", exotic_body),
        ("id outside the vocabulary", "/v1/score", request(completions=[[3, vocab_size]])),
        ("top_k above the limit", "/v1/score", request(top_k=max_top_k + 1)),
        ("temperature 1e-45", "/v1/score", request(temperature=1e-45)),
        ("an empty completion", "/v1/score", bytes(mismatched[:-4]) + bytes(4)),
        ("trailing slash", "/v1/score/", request()),
    ]


async def send_good(client: httpx.AsyncClient, url: str, body) -> int:
    """Score one good request; its token count, or raise on any failure."""
    content, num_tokens, num_completion_tokens = body
    response = await client.post(f"{url}/v1/score", content=content)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    scores, _ = decode_scores(response.content)
    assert scores.sampled_logprobs_M.numel() == num_completion_tokens, "wrong token count"
    return num_tokens


async def send_hostile(client: httpx.AsyncClient, url: str, body) -> int:
    """Send one malformed request; 0 tokens, or raise unless the answer is a 4xx."""
    name, path, content = body
    try:
        response = await client.post(f"{url}{path}", content=content)
    except httpx.TransportError as error:
        raise RuntimeError(f"{name}: {type(error).__name__}: {error}") from error
    if not 400 <= response.status_code < 500:
        raise RuntimeError(f"{name}: HTTP {response.status_code}: {response.text[:200]}")
    return 0


async def run_client(
    send, client: httpx.AsyncClient, url: str, bodies, first: int, deadline: float, result
) -> None:
    """One client: `send` the bodies in turn, from `first` on, until the deadline."""
    index = first
    while time.monotonic() < deadline:
        body = bodies[index % len(bodies)]
        index += 1
        start = time.perf_counter()
        try:
            num_tokens = await send(client, url, body)
        except Exception as error:  # count every failure; the run goes on
            result.errors.append(f"{type(error).__name__}: {error}")
            continue
        result.latencies_ms.append(1000 * (time.perf_counter() - start))
        result.tokens += num_tokens


async def run_load(
    args: argparse.Namespace, url: str, bodies, bad_bodies
) -> tuple[LoadResult, LoadResult, float]:
    """The good clients' and the hostile clients' results, and the elapsed seconds."""
    good, hostile = LoadResult(), LoadResult()
    headers = {**auth_headers(args.api_key), "Content-Type": CONTENT_TYPE}
    num_clients = args.clients + args.hostile_clients
    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        start = time.monotonic()
        deadline = start + args.duration
        await asyncio.gather(
            *(
                run_client(send_good, client, url, bodies, i * 7, deadline, good)
                for i in range(args.clients)
            ),
            *(
                run_client(send_hostile, client, url, bad_bodies, i, deadline, hostile)
                for i in range(args.hostile_clients)
            ),
        )
        return good, hostile, time.monotonic() - start


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_table(rows: list[tuple[str, int, LoadResult]], elapsed_s: float, batching: str) -> None:
    """One row per kind of client: (kind, number of clients, their result)."""
    header = f"{'clients':>15} {'duration_s':>10} {'requests':>8} {'requests/s':>10} "
    header += f"{'tokens/s':>9} {'p50_ms':>7} {'p99_ms':>7} {'errors':>6}"
    print(header)
    for kind, num_clients, result in rows:
        requests = len(result.latencies_ms)
        row = f"{f'{num_clients} {kind}':>15} {elapsed_s:>10.1f} {requests:>8} "
        row += f"{requests / elapsed_s:>10.2f} {result.tokens / elapsed_s:>9.0f} "
        row += f"{percentile(result.latencies_ms, 0.5):>7.0f} "
        row += f"{percentile(result.latencies_ms, 0.99):>7.0f} {len(result.errors):>6}"
        print(row)
    print(batching)
    for kind, _, result in rows:
        for error, count in Counter(result.errors).most_common(10):
            print(f"error ({kind}) x{count}: {error}")


def start_server(model: str, top_k: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "opd.cli", "teacher", "serve", "--model", model,
        "--port", str(port), "--max_top_k", str(max(top_k, 128)), "--log_level", "warning",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"the server did not start in 300 s:\n{log_path.read_text()[-3000:]}")


def server_info(url: str, api_key: str | None) -> dict:
    response = httpx.get(f"{url}/info", headers=auth_headers(api_key), timeout=30)
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process = None
    url = args.url
    if url is None:
        model = args.model
        if model is None:
            from opd.demo.pretrain import prepare_demo_models

            model = str(prepare_demo_models()[0])
        log_path = Path(tempfile.mkdtemp(prefix="opd-load-")) / "server.log"
        process, url = start_server(model, args.top_k, log_path)
        print(f"started opd teacher serve on {model} at {url} (log: {log_path})")
    try:
        before = server_info(url, args.api_key)
        bodies = build_bodies(args, int(before["vocab_size"]), before["max_sequence_tokens"])
        bad_bodies = hostile_bodies(bodies[0][0], int(before["vocab_size"]), before["max_top_k"])
        print(f"model {before['model']} ({before['backend']}), {args.sequences} sequences/request")
        good, hostile, elapsed_s = asyncio.run(run_load(args, url, bodies, bad_bodies))
        after = server_info(url, args.api_key)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    requests = after["stats"]["requests"] - before["stats"]["requests"]
    batches = after["stats"]["batches"] - before["stats"]["batches"]
    batching = (
        f"server: {requests} requests in {batches} batches ({requests / max(batches, 1):.1f}/batch)"
    )
    rows = [("good", args.clients, good)]
    if args.hostile_clients:
        rows.append(("hostile", args.hostile_clients, hostile))
    print_table(rows, elapsed_s, batching)
    if process is not None:  # the clients share the machine with the server they load
        times = os.times()
        print(f"CPU seconds: clients {times.user + times.system:.0f}, "
              f"server {times.children_user + times.children_system:.0f}")  # fmt: skip
    return 1 if good.errors or hostile.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
