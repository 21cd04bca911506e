"""Score sets on a bucket root (issue 18): `lopd cache ls/show/verify/export` and `open_cache` on moto's S3 server
answer as they do on the local copy, and `verify` finds an object damaged or removed in the bucket.

The score set is made without an engine (tests/toy_sets.py: the real writers, a transformers forward of the toy
teacher) in a local root, and copied object by object under `s3://<bucket>/prefix`, as `aws s3 sync` would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from child_env import subprocess_env
from click.testing import CliRunner
from safetensors.torch import load_file
from toy_sets import STUDENT, make_rollout_set, make_score_set, rollout_records

from lopd import location
from lopd.cache import layout, open_cache
from lopd.cache.bucket_set import score_set_writer
from lopd.cache.layout import read_shard, shard_bytes, shard_checksum
from lopd.cache.score_set import shard_location
from lopd.cli import main
from lopd.cost.ledger import append_row, read_rows
from lopd.errors import LopdError
from lopd.rollout_set import RolloutSet

SET_ID = "s-r-bucket"


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """A storage root holding one rollout set (40 rows), its score set (3 shards of 16 rows) and a ledger row."""
    root = tmp_path_factory.mktemp("cache-bucket")
    rollouts = make_rollout_set(root / "rollouts" / "r-bucket", rollout_records([[1.0, 0.0]] * 20))
    make_score_set(root, rollouts)
    append_row(root, {"experiment": "exp-a", "stage": "score", "artifact": SET_ID, "inputs": ["r-bucket"],
                      "device_kind": "cpu", "device_count": 1})
    return root


@pytest.fixture
def bucket(local: Path, bucket_root: str) -> str:
    """The local root copied into a fresh bucket prefix; returns the bucket root URL."""
    fs, prefix = location.filesystem(bucket_root)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{prefix}/{file.relative_to(local).as_posix()}", file.read_bytes())
    return bucket_root


def cli(*args: str) -> tuple[int, str]:
    """`lopd ARGS...` in this process: exit code and stdout (stderr apart)."""
    result = CliRunner().invoke(main, list(args), prog_name="lopd")
    return result.exit_code, result.stdout


def test_locations_keep_local_paths_and_normalise_urls(tmp_path: Path):
    assert location.as_location(f"file://{tmp_path}") == tmp_path
    assert location.as_location(str(tmp_path)) == tmp_path
    url = location.join("s3://b/prefix/scores/s1", "../../rollouts/r1")
    assert url == "s3://b/prefix/rollouts/r1" and location.basename(url) == "r1"
    assert location.parent(url) == "s3://b/prefix/rollouts" and location.is_bucket(url)


def test_cache_commands_on_a_bucket_answer_as_on_the_local_copy(local: Path, bucket: str, tmp_path: Path):
    listed = {}
    for root in (str(local), bucket):
        code, out = cli("cache", "ls", "--root", root, "--json")
        assert code == 0, out
        listed[root] = json.loads(out)
    assert [e.pop("path") for e in listed[bucket]] == [f"{bucket}/scores/{SET_ID}"]
    [entry] = listed[bucket]
    assert entry["experiments"] == ["exp-a"] and entry["rows"] == 40 and entry["bytes"] > 0
    assert [dict(e, path=None) for e in listed[str(local)]] == [dict(entry, path=None)]
    assert cli("cache", "ls", "--root", bucket)[1] == cli("cache", "ls", "--root", str(local))[1]

    local_manifest = cli("cache", "show", "s-r", "--root", str(local))[1]
    for ref in ("s-r", SET_ID, f"{bucket}/scores/{SET_ID}"):  # id prefix, id, URL
        assert cli("cache", "show", ref, "--root", bucket) == (0, local_manifest)
    result = CliRunner().invoke(main, ["cache", "show", "nothing", "--root", bucket], prog_name="lopd")
    assert result.exit_code != 0 and "no score set matches 'nothing'" in result.stderr

    assert cli("cache", "verify", "--root", bucket) == (0, f"{SET_ID}: ok\n")
    assert cli("cache", "verify", "s-r", "--root", bucket, "--json") == cli("cache", "verify", "s-r", "--root",
                                                                           str(local), "--json")

    tables = []
    for root in (str(local), bucket):
        out = tmp_path / f"{len(tables)}.parquet"
        assert cli("cache", "export", "s-r", "--root", root, "--out", str(out)) == (0, f"{out}\n")
        tables.append(pq.read_table(out))
    assert tables[0].num_rows == 40 and tables[0].equals(tables[1])


def test_a_score_set_in_a_bucket_reads_as_the_local_one(local: Path, bucket: str):
    here, there = open_cache(local / "scores" / SET_ID), open_cache(f"{bucket}/scores/{SET_ID}")
    assert there.manifest == here.manifest and len(there) == len(here) == 40
    for name, entry in here.manifest["shards"].items():
        shard = shard_location(there.path, name)
        assert (shard_checksum(shard), shard_bytes(shard)) == (entry["checksum"], entry["bytes"])
    for i in range(len(here)):
        a, b = here[i], there[i]
        for field in ("prompt_ids", "response_ids", "behaviour_logprobs", "teacher_logprobs", "topk_ids",
                      "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert (a.reward, a.group_id) == (b.reward, b.group_id)


def test_a_bucket_shard_is_fetched_once_to_check_and_decode(local: Path, bucket: str, monkeypatch):
    expected = open_cache(local / "scores" / SET_ID)[20].topk_ids
    fetched = []
    monkeypatch.setattr(layout, "read_bytes", lambda where: fetched.append(where) or location.read_bytes(where))
    monkeypatch.setattr(layout, "FsspecStore", None)  # zarr must decode from the fetched bytes, not read again
    cache = open_cache(f"{bucket}/scores/{SET_ID}")
    np.testing.assert_array_equal(cache[20].topk_ids, expected)
    shard = shard_location(cache.path, "00001")
    assert sorted(fetched) == sorted(where for _, where, _ in location.files(shard))


def test_verify_finds_a_damaged_and_a_missing_shard_in_the_bucket(bucket: str):
    fs, _ = location.filesystem(bucket)
    set_url = f"{bucket}/scores/{SET_ID}"
    chunk = next(where for relative, where, _ in location.files(shard_location(set_url, "00001"))
                 if "/c/" in relative)
    fs.pipe_file(location.filesystem(chunk)[1], b"not what was scored")
    fs.rm(location.filesystem(shard_location(set_url, "00002"))[1], recursive=True)

    code, out = cli("cache", "verify", "--root", bucket, "--json")
    assert code == 1
    assert json.loads(out) == {SET_ID: ["shard 00001: checksum mismatch (truncated or modified)",
                                        "shard 00002: missing"]}
    cache = open_cache(set_url)
    assert cache[0].teacher_logprobs.size  # shard 00000 is intact
    with pytest.raises(LopdError, match="shard 00001 is corrupt"):
        cache[16]
    with pytest.raises(LopdError, match="shard 00002 is missing"):
        cache[32]


def test_gc_on_a_bucket_removes_only_what_no_experiment_used(bucket: str):
    fs, prefix = location.filesystem(bucket)
    fs.pipe_file(f"{prefix}/rollouts/r-unused/meta.json", json.dumps({"id": "r-unused"}).encode())
    fs.pipe_file(f"{prefix}/rollouts/r-unused/rollouts.parquet", b"")
    code, out = cli("cache", "gc", "--root", bucket, "--dry-run", "--json")
    assert code == 0 and json.loads(out)["removed"] == [f"{bucket}/rollouts/r-unused"]
    assert location.exists(f"{bucket}/rollouts/r-unused/meta.json")
    assert cli("cache", "gc", "--root", bucket)[1].splitlines()[-1] == "1 entries removed"
    assert not location.glob(f"{bucket}/rollouts", "r-unused/*")
    assert cli("cache", "verify", "--root", bucket) == (0, f"{SET_ID}: ok\n")  # the used set is kept


def test_gc_on_a_bucket_removes_orphaned_write_attempts_once_old_enough(bucket: str):
    """Attempts no commit names (a killed writer's) go once idle for `--attempts-older-than` hours; committed ones,
    and the sets around them, stay."""
    fs, prefix = location.filesystem(bucket)
    set_key = f"{prefix}/scores/{SET_ID}"
    # shard 00001 as a bucket writer commits it: under an attempt name, which its commit record names
    manifest = json.loads(fs.cat_file(f"{set_key}/manifest.json"))
    entry = dict(manifest["shards"].pop("00001"), attempt="a1a1a1a1a1a1")
    for relative, where, _ in location.files(f"{bucket}/scores/{SET_ID}/shards/00001"):
        fs.pipe_file(f"{set_key}/shards/00001-a1a1a1a1a1a1/{relative}", location.read_bytes(where))
    fs.rm(f"{set_key}/shards/00001", recursive=True)
    fs.pipe_file(f"{set_key}/manifest.json", json.dumps(manifest).encode())
    fs.pipe_file(f"{set_key}/commits/00001.json", json.dumps(entry).encode())
    # a rollout set in the bucket layout, used by an experiment: meta.json names its committed attempt
    fs.pipe_file(f"{prefix}/rollouts/r-new/attempts/c0c0c0c0c0c0/rollouts.parquet", b"committed table")
    fs.pipe_file(f"{prefix}/rollouts/r-new/meta.json",
                 json.dumps({"id": "r-new", "table": "attempts/c0c0c0c0c0c0/rollouts.parquet"}).encode())
    append_row(bucket, {"experiment": "exp-b", "stage": "rollout", "artifact": "r-new", "inputs": [],
                        "device_kind": "cpu", "device_count": 1})
    orphans = ["rollouts/r-dead/attempts/e4e4e4e4e4e4",  # an attempt and no meta.json
               "rollouts/r-new/attempts/d3d3d3d3d3d3", f"scores/{SET_ID}/shards/00002-b2b2b2b2b2b2"]
    for orphan in orphans:
        fs.pipe_file(f"{prefix}/{orphan}/{'zarr.json' if 'scores' in orphan else 'rollouts.parquet'}", b"killed")

    def objects() -> list[str]:
        fs.invalidate_cache()
        return sorted(fs.find(prefix))

    before = objects()
    for hours in ([], ["--attempts-older-than", "1000"]):  # the default (24 h) and a high threshold keep them
        assert cli("cache", "gc", "--root", bucket, *hours, "--json") == (
            0, json.dumps({"dry_run": False, "removed": []}, indent=1) + "\n")
    assert objects() == before
    urls = [f"{bucket}/{orphan}" for orphan in orphans]
    code, out = cli("cache", "gc", "--root", bucket, "--attempts-older-than", "0", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["removed"] == urls and objects() == before
    code, out = cli("cache", "gc", "--root", bucket, "--attempts-older-than", "0")
    assert code == 0 and out.splitlines() == [*(f"removed {url}" for url in urls), "3 entries removed"]
    assert objects() == [key for key in before if not any(key.startswith(f"{prefix}/{o}/") for o in orphans)]
    assert cli("cache", "verify", "--root", bucket) == (0, f"{SET_ID}: ok\n")
    assert json.loads(cli("cache", "gc", "--root", bucket, "--attempts-older-than", "0", "--json")[1])["removed"] == []
    assert location.is_file(f"{bucket}/rollouts/r-new/attempts/c0c0c0c0c0c0/rollouts.parquet")

    result = CliRunner().invoke(main, ["cache", "gc", "--root", bucket, "--attempts-older-than", "-1"],
                                prog_name="lopd")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--attempts-older-than" in lines[0], result.stderr


def test_repair_on_a_bucket_root_reads_the_set_and_its_rollouts_there(bucket: str):
    """`lopd cache repair` takes a bucket root and rebuilds the set's identity from the manifest and rollout set in the
    bucket before any engine starts; this fixture's set has a made-up id, which repair must refuse in one line
    (rescoring a damaged shard in a bucket: tests/test_score_bucket.py)."""
    result = CliRunner().invoke(main, ["cache", "repair", SET_ID[:6], "--root", bucket], prog_name="lopd")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert f"score set {SET_ID} cannot be repaired here" in lines[0]


def _rows(cache) -> list[tuple]:
    return [tuple(np.asarray(getattr(cache[i], f)).tobytes() for f in ("teacher_logprobs", "topk_ids", "topk_logprobs",
                                                                        "tail_logprob")) for i in range(len(cache))]


def _bucket_with_rollouts(local: Path, bucket_root: str) -> RolloutSet:
    """Only the rollout set copied into the bucket (the score set is to be written there)."""
    fs, prefix = location.filesystem(bucket_root)
    for file in (local / "rollouts" / "r-bucket").iterdir():
        fs.pipe_file(f"{prefix}/rollouts/r-bucket/{file.name}", file.read_bytes())
    return RolloutSet.open(f"{bucket_root}/rollouts/r-bucket")


def test_a_score_set_written_to_a_bucket_equals_the_local_one(local: Path, bucket_root: str):
    rollouts = _bucket_with_rollouts(local, bucket_root)
    there = make_score_set(bucket_root, rollouts)
    here = open_cache(local / "scores" / SET_ID)
    assert there.path == f"{bucket_root}/scores/{SET_ID}" and there.manifest["complete"]
    assert _rows(there) == _rows(here)
    strip = {"attempt", "teacher_seconds"}
    assert ({n: {k: v for k, v in e.items() if k not in strip} for n, e in there.manifest["shards"].items()}
            == here.manifest["shards"])  # same bytes per shard: same checksums
    assert cli("cache", "verify", "--root", bucket_root) == (0, f"{SET_ID}: ok\n")


def test_two_writers_of_one_shard_commit_exactly_one_copy(local: Path, bucket_root: str):
    set_url = f"{bucket_root}/scores/{SET_ID}"
    header = dict(open_cache(local / "scores" / SET_ID).manifest)
    arrays = read_shard(local / "scores" / SET_ID / "shards" / "00000")
    first, second = (score_set_writer(set_url, header, rows_per_shard=16) for _ in range(2))
    plan = first.plan(40)[0]
    with first.claim(plan) as a, second.claim(plan) as b:
        assert a and b  # no locks on a bucket: both may compute the shard
        first.commit(plan, arrays)
        second.commit(plan, arrays)  # loses the conditional PUT and removes its own attempt
    [entry] = second.manifest()["shards"].values()
    attempts = [location.basename(p) for p in location.glob(f"{set_url}/shards", "*")]
    assert attempts == [f"00000-{entry['attempt']}"]
    with first.claim(plan) as again:
        assert not again
    other = dict(header, id="s-other")
    with pytest.raises(LopdError, match="already holds a different score set"):
        score_set_writer(set_url, other, rows_per_shard=16)


WRITE_TO_BUCKET = """
import sys
sys.path.insert(0, "tests")
from lopd.rollout_set import RolloutSet
from toy_sets import make_score_set
make_score_set(sys.argv[1], RolloutSet.open(sys.argv[1] + "/rollouts/r-bucket"))
"""


def test_a_writer_killed_before_its_commit_leaves_no_visible_shard(local: Path, bucket_root: str):
    _bucket_with_rollouts(local, bucket_root)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), LOPD_CRASH_AT="shard_staged:2")
    killed = subprocess.run([sys.executable, "-c", WRITE_TO_BUCKET, bucket_root], env=env, capture_output=True,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]

    set_url = f"{bucket_root}/scores/{SET_ID}"
    manifest = json.loads(cli("cache", "show", SET_ID, "--root", bucket_root)[1])
    assert sorted(manifest["shards"]) == ["00000"] and not manifest["complete"]
    assert len(location.glob(f"{set_url}/shards", "00001-*")) == 1  # the killed attempt's objects, unreferenced
    code, out = cli("cache", "verify", "--root", bucket_root, "--json")
    assert code == 1 and json.loads(out)[SET_ID][0].startswith("incomplete")
    with pytest.raises(LopdError, match="incomplete"):
        open_cache(set_url)

    env.pop("LOPD_CRASH_AT")
    subprocess.run([sys.executable, "-c", WRITE_TO_BUCKET, bucket_root], env=env, check=True, capture_output=True)
    assert cli("cache", "verify", "--root", bucket_root) == (0, f"{SET_ID}: ok\n")
    assert _rows(open_cache(set_url)) == _rows(open_cache(local / "scores" / SET_ID))


def test_training_reads_a_score_set_from_the_bucket(local: Path, bucket: str, tmp_path: Path):
    """`lopd train --cache s3://...` with a local root, and `lopd train --cache <id> --root s3://...` (the id resolved
    and the ledger row written in the bucket): the same weights as from the local set."""
    trained = []
    local_root = str(tmp_path / "root")
    runs = [(str(local / "scores" / SET_ID), local_root), (f"{bucket}/scores/{SET_ID}", local_root),
            (SET_ID[:6], bucket)]
    for ref, root in runs:
        out = tmp_path / f"out{len(trained)}"
        env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "lopd.cli", "train", "--student", STUDENT, "--cache", ref, "--out", str(out),
             "--root", root, "--loss", "rkl_topk", "--steps", "2", "--batch-size", "8", "--lr",
             "1e-3", "--seed", "1", "--allow-teacher-mismatch", "--experiment", "from-bucket"],
            env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["steps"] == 2  # stdout is the result alone (DeepSpeed's chatter: stderr)
        (weights,) = out.glob("*.safetensors")
        trained.append(load_file(weights))
    for other in trained[1:]:
        assert other.keys() == trained[0].keys()
        for name in trained[0]:
            assert torch.equal(trained[0][name], other[name]), name
    rows = [r for r in read_rows(bucket) if r["experiment"] == "from-bucket"]
    assert [(r["stage"], r["inputs"][1]) for r in rows] == [("train", SET_ID)]
