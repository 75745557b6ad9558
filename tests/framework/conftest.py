"""Fixtures shared by the framework tests."""

from pathlib import Path

import pytest
from transformers import AutoConfig

TINY = Path(__file__).resolve().parents[2] / "examples/pretrain_language_model/qwen3_moe/tiny.json"


@pytest.fixture
def tiny_config():
    config = AutoConfig.from_pretrained(TINY)
    config.ep_size = 1
    return config
