"""`lopd score` killed with SIGKILL at any point resumes to the same cache; concurrent scorers cooperate."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from lopd.cache import open_cache
from lopd.cache.admin import verify
from lopd.rollout import SamplingConfig, rollout
from lopd.score import ScoreConfig, score
from lopd.toy import TEACHER_DIR, words

pytestmark = pytest.mark.slow
TEACHER = str(TEACHER_DIR)
ARGS = ["--k", "8", "--rows-per-shard", "16", "--logprob-dtype", "float32"]


@pytest.fixture(scope="module")
def job(pool, tmp_path_factory):
    """A 96-row rollout set and the score set an uninterrupted in-process run produces from it."""
    root = tmp_path_factory.mktemp("crash-root")
    prompts = [asdict(p) for p in words.make_prompts("test", 48)]
    rollouts, _ = rollout(TEACHER, prompts, SamplingConfig(n=2, max_tokens=10), root=root, llm=pool.get(TEACHER), quiet=True)
    reference = score(TEACHER, rollouts, ScoreConfig(k=8, rows_per_shard=16, logprob_dtype="float32"), root=root,
                      llm=pool.get(TEACHER), quiet=True)
    return rollouts, open_cache(reference.path)


def lopd_score(rollouts, out, crash_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("LOPD_CRASH_AT", None)
    if crash_at:
        env["LOPD_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "lopd.cli", "score", "--teacher", TEACHER, "--rollouts",
                             str(rollouts.path), "--out", str(out), *ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_cache(path, reference) -> None:
    assert verify(path) == []
    cache = open_cache(path)
    assert cache.id == reference.id and len(cache) == len(reference)
    for i in range(len(cache)):
        a, b = cache[i], reference[i]
        for field in ("teacher_logprobs", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5)
    total = sum(entry["rows"][1] - entry["rows"][0] for entry in cache.manifest["shards"].values())
    assert total == len(reference)  # every row exactly once


@pytest.mark.parametrize("crash_at", ["shard_staged:3", "shard_renamed:2", "shard_committed:4"])
def test_killed_scorer_resumes_to_an_identical_cache(job, tmp_path, crash_at):
    rollouts, reference = job
    out = tmp_path / "cache"
    killed = lopd_score(rollouts, out, crash_at)
    killed.communicate(timeout=300)
    assert killed.returncode == -9  # SIGKILL, no cleanup ran
    with pytest.raises(Exception, match="incomplete"):
        open_cache(out)
    resumed = lopd_score(rollouts, out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_cache(out, reference)
    assert not list((out / ".staging").iterdir())


def test_two_concurrent_scorers_do_not_lose_rows(job, tmp_path):
    rollouts, reference = job
    out = tmp_path / "cache"
    first, second = lopd_score(rollouts, out), lopd_score(rollouts, out)
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert_same_cache(out, reference)
