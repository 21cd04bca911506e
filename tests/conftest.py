"""Shared fixtures. vLLM engines take tens of seconds to start on CPU, so one pool serves the whole session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lopd-root")


@pytest.fixture(scope="session")
def pool():
    from lopd.engine import EnginePool

    engines = EnginePool(max_logprobs=64)
    yield engines
    engines.close()
