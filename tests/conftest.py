"""Shared fixtures. vLLM engines take tens of seconds to start on CPU, so one pool serves the whole session."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from moto_s3 import local_s3, s3_environment

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


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free local port, started on first use and killed at the end of the session."""
    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def bucket_root(s3_endpoint, monkeypatch) -> str:
    """`s3://<fresh bucket>/prefix`, reached through the standard AWS variables only."""
    import boto3

    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    bucket = f"lopd-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/prefix"
