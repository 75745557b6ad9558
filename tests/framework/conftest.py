"""Fixtures shared by the framework tests."""

import socket
from pathlib import Path

import pytest
import torch.distributed as dist
from transformers import AutoConfig

from pithtrain.modules.distributed import init_distributed

TINY = Path(__file__).resolve().parents[2] / "examples/pretrain_language_model/qwen3_moe/tiny.json"


@pytest.fixture
def tiny_config():
    config = AutoConfig.from_pretrained(TINY)
    config.ep_size = 1
    return config


@pytest.fixture
def single_rank_world(monkeypatch):
    """A one-rank gloo world on CPU (pp = ep = 1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)
    ctx = init_distributed(1, 1, "cpu")
    yield ctx
    dist.destroy_process_group()
