"""`lopd score` killed with SIGKILL at any point resumes to the same cache; concurrent scorers cooperate."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
from child_env import finish

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


def lopd_score(rollouts, out, log, crash_at: str | None = None) -> subprocess.Popen:
    """`lopd score` in its own session, output to a file: a SIGKILLed parent leaves its vLLM engine processes
    behind (holding any pipes), exactly as a killed job would, so the test reaps the whole session itself."""
    env = dict(os.environ)
    env.pop("LOPD_CRASH_AT", None)
    if crash_at:
        env["LOPD_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "lopd.cli", "score", "--teacher", TEACHER, "--rollouts",
                             str(rollouts.path), "--out", str(out), *ARGS], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


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
    assert finish(lopd_score(rollouts, out, tmp_path / "killed.log", crash_at)) == -9  # SIGKILL: no cleanup ran
    with pytest.raises(Exception, match="incomplete"):
        open_cache(out)
    log = tmp_path / "resumed.log"
    assert finish(lopd_score(rollouts, out, log)) == 0, log.read_text()[-2000:]
    assert_same_cache(out, reference)
    assert not list((out / ".staging").iterdir())


def test_two_concurrent_scorers_do_not_lose_rows(job, tmp_path):
    rollouts, reference = job
    out = tmp_path / "cache"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [lopd_score(rollouts, out, log) for log in logs]
    for proc, log in zip(procs, logs):
        assert finish(proc) == 0, log.read_text()[-2000:]
    assert_same_cache(out, reference)


@pytest.mark.parametrize("how", ["rerun lopd score", "lopd cache repair"])
def test_a_damaged_set_is_repaired_by_rescoring_exactly_its_damaged_shards(job, pool, how):
    """Before: after a shard was deleted or corrupted, rerunning `lopd score` was a cache hit and the set stayed
    broken (only deleting the whole set helped). Now the rerun (or `lopd cache repair`) rescores just those."""
    from lopd.score import repair
    from test_cache import flip_one_byte

    rollouts, reference = job
    root = reference.path.parent.parent
    path = root / f"repair-{how.split()[-1]}" / reference.id  # same depth: the manifest's relative rollout path holds
    shutil.copytree(reference.path, path)
    shutil.rmtree(path / "shards" / "00001")
    flip_one_byte(path / "shards" / "00003")
    untouched = {name: (path / "shards" / name / "zarr.json").stat().st_mtime_ns for name in ("00000", "00002")}
    assert verify(path) == ["shard 00001: missing", "shard 00003: checksum mismatch (truncated or modified)"]
    if how == "lopd cache repair":
        result = repair(path, root, llm=pool.get(TEACHER))
    else:
        config = ScoreConfig(k=8, rows_per_shard=16, logprob_dtype="float32")
        result = score(TEACHER, rollouts, config, root=root, out=path, llm=pool.get(TEACHER), quiet=True)
    assert not result.reused and sorted(result.repaired) == ["00001", "00003"]
    assert result.positions == sum(reference.manifest["shards"][n]["positions"] for n in ("00001", "00003"))
    assert {name: (path / "shards" / name / "zarr.json").stat().st_mtime_ns for name in untouched} == untouched
    assert_same_cache(path, reference)
    assert score(TEACHER, rollouts, ScoreConfig(k=8, rows_per_shard=16, logprob_dtype="float32"), root=root, out=path,
                 llm=pool.get(TEACHER), quiet=True).reused  # intact again: a plain cache hit


def live_session_members(sid: int) -> list[str]:
    """Processes of session `sid` still running (zombies hold no memory and are left to whoever reaps them)."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(f"{proc.pid} {proc.info['name']}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return members


def test_killed_scorer_leaves_no_engine_processes(job, tmp_path):
    """Before: `lopd score` killed with SIGKILL left its vLLM EngineCore (and workers) running indefinitely.
    Now the engine notices its parent is gone and exits within seconds."""
    rollouts, _ = job
    proc = lopd_score(rollouts, tmp_path / "cache", tmp_path / "killed.log", "shard_committed:1")
    try:
        assert proc.wait(timeout=300) == -9  # SIGKILLed while its engine was serving (one shard scored)
        deadline = time.monotonic() + 30
        while (left := live_session_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], (left, (tmp_path / "killed.log").read_text()[-2000:])
    finally:
        finish(proc)
