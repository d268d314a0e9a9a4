"""Shared fixtures: tiny models built locally (no downloads), a small prompt file, servers on
loopback (in a thread or a subprocess).

Every model here is a real transformers model (Qwen2 architecture, head size 64 so vLLM's CPU
attention accepts it) saved to disk, so transformers and vLLM load it like any checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Kernel parity tests run the Triton kernels in Triton's CPU interpreter, which must be switched
# on before anything imports triton (vLLM and opd.kernels do, at import): Triton binds its own
# `tl.sum`/`tl.max` then. Everything else stays on the torch path (`OPD_KERNELS=torch`); the
# parity tests pick an implementation explicitly with `override_impl`. On a CUDA machine neither
# is set, so the `gpu` tests compile the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OPD_KERNELS", "torch")

from opd.demo.tiny import TinyShape, save_tiny  # after the environment above

# The helper modules in tests/integration (e.g. `sync_probe`) are imported by the scripts the
# tests launch from there, where that folder is sys.path[0]; the same names import here (and in
# scripts/gpu_check.sh's run of tests/gpu). Appended: it never shadows an installed package.
sys.path.append(str(Path(__file__).parent / "integration"))

# Each xdist worker gets its share of the cores. torch defaults to one thread per core, so two
# workers (and the subprocesses they start) oversubscribe a 2-core machine, and OpenMP's spinning
# threads then slow every torch step down: two concurrent runs of 60 tiny-model training steps
# took 20 s with 2 threads each and 3.3 s with 1 thread each. Subprocesses inherit the share
# through OMP_NUM_THREADS; a value the user set wins.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("student"), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny(
        tmp_path_factory.mktemp("teacher"), TinyShape(hidden_size=192, num_heads=3), seed=1
    )


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _serve_in_thread(app, port: int = 0):
    """Run an ASGI `app` with uvicorn on loopback in a background thread; yields its URL.

    `app` may also be a ready `uvicorn.Config` (e.g. `opd.commands.serve.build_uvicorn_config`).
    """
    import uvicorn

    if not isinstance(app, uvicorn.Config):
        app = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a TCP port on loopback that nothing listens on right now."""
    return _free_port


@pytest.fixture(scope="session")
def serve_in_thread():
    """`with serve_in_thread(app, port=0) as url:` serves a FastAPI app (or a `uvicorn.Config`)
    on loopback (a thread)."""
    return _serve_in_thread


def _wait_healthy(url: str, process, log_path: Path, timeout_s: float = 300) -> None:
    """Until `url/health` answers 200; fails with the log's tail if the process dies or hangs."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited:\n{log_path.read_text()[-4000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not become healthy:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def wait_healthy():
    """`wait_healthy(url, process, log_path)`: block until a server subprocess answers /health."""
    return _wait_healthy


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process's whole group (engine children too), SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextmanager
def _serve_subprocess(command: list[str], port: int, log_path: Path, env: dict | None = None):
    """Run a server `command` that listens on loopback `port` in its own process group, its
    output in `log_path`; yields its URL once `/health` answers, and stops the group at the end."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path)
        yield url
    finally:
        _stop_process_group(process)


@pytest.fixture(scope="session")
def serve_subprocess():
    """`with serve_subprocess(command, port, log_path, env=None) as url:` a server subprocess
    (e.g. `opd teacher serve`, vLLM's OpenAI server), healthy inside the block, killed after."""
    return _serve_subprocess


def _child_report(script: str, *args) -> dict:
    """Run `python script *args` (a test file that is also a script: vLLM engines stay out of
    pytest's process) and return the JSON object its last stdout line holds."""
    result = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def child_report():
    """`child_report(__file__, *args)`: a child process's JSON report (its last stdout line)."""
    return _child_report


@pytest.fixture(scope="module")
def teacher_backend(tiny_teacher):
    """`opd teacher serve`'s transformers backend of the tiny teacher (batch size 4)."""
    from opd.commands.serve import ServeArguments, build_backend

    return build_backend(ServeArguments(model=str(tiny_teacher), batch_size=4))


@pytest.fixture(scope="session")
def serve_teacher(serve_in_thread):
    """`with serve_teacher(args, backend) as url:` `opd teacher serve`'s own app and uvicorn
    configuration for `ServeArguments` `args`, on loopback (a thread)."""
    from opd.commands.serve import build_app, build_uvicorn_config

    def serve(args, backend):
        return serve_in_thread(build_uvicorn_config(args, build_app(args, backend)))

    return serve


def pytest_collection_modifyitems(config, items):
    """Files with a test marked `slow` run first (stable otherwise), so that under xdist's
    `--dist loadfile` the long files start early and the run does not end on one worker with a
    long file while the other idles (longest-first scheduling: measured tail of 6 min before)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
