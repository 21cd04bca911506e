"""`lopd score --root s3://bucket/prefix` (issue 18) on moto's S3 server with the toy teacher in vLLM: the set it
writes into the bucket is the one a local root gets (same id, same shard checksums), a rerun is a cache hit or
rescores a damaged shard, and two concurrent `lopd score` processes of one rollout set leave one complete set,
no visible partial shard and exactly their two ledger rows.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from bucket_checks import check_one_complete_set, score_concurrently, verify
from toy_sets import TEACHER, make_rollout_set, rollout_records

from lopd import location
from lopd.cache.score_set import read_manifest, shard_location
from lopd.cost.ledger import read_rows
from lopd.errors import LopdError
from lopd.rollout_set import RolloutSet
from lopd.score import ScoreConfig, repair, score

pytestmark = pytest.mark.slow
CONFIG = ScoreConfig(k=8, rows_per_shard=8, logprob_dtype="float32")  # 40 rows: 5 shards
ARGS = ["--k", "8", "--rows-per-shard", "8", "--logprob-dtype", "float32"]


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory):
    """A local root holding a 40-row rollout set `r-bucket` and its score set, scored by the session's engine."""
    root = tmp_path_factory.mktemp("score-local")
    rollouts = make_rollout_set(root / "rollouts" / "r-bucket", rollout_records([[1.0, 0.0]] * 20))
    result = score(TEACHER, rollouts, CONFIG, root=root, llm=pool.get(TEACHER), quiet=True)
    return root, read_manifest(result.path)


def _with_rollouts(local: Path, bucket_root: str) -> RolloutSet:
    """The local rollout set copied object by object under the bucket root."""
    fs, prefix = location.filesystem(bucket_root)
    for file in (local / "rollouts" / "r-bucket").iterdir():
        fs.pipe_file(f"{prefix}/rollouts/r-bucket/{file.name}", file.read_bytes())
    return RolloutSet.open(f"{bucket_root}/rollouts/r-bucket")


def _checksums(manifest: dict) -> dict[str, str]:
    return {name: entry["checksum"] for name, entry in manifest["shards"].items()}


def test_scoring_into_a_bucket_makes_the_local_set(pool, reference, bucket_root: str):
    local, expected = reference
    rollouts = _with_rollouts(local, bucket_root)
    llm = pool.get(TEACHER)
    result = score(TEACHER, rollouts, CONFIG, root=bucket_root, llm=llm, quiet=True)
    set_url = f"{bucket_root}/scores/{expected['id']}"
    assert (result.id, result.path, result.complete, result.reused) == (expected["id"], set_url, True, False)
    manifest = read_manifest(set_url)
    assert _checksums(manifest) == _checksums(expected) and len(manifest["shards"]) == 5
    assert manifest["rollout_set"]["path"] == expected["rollout_set"]["path"] == "../../rollouts/r-bucket"
    assert verify(bucket_root) == (0, f"{expected['id']}: ok\n")

    assert score(TEACHER, rollouts, CONFIG, root=bucket_root, llm=llm, quiet=True).reused  # a cache hit

    fs, _ = location.filesystem(bucket_root)
    chunk = next(where for relative, where, _ in location.files(shard_location(set_url, "00002",
                                                                               manifest["shards"]["00002"]))
                 if "/c/" in relative)
    fs.pipe_file(location.filesystem(chunk)[1], b"not what was scored")
    repaired = repair(set_url, bucket_root, llm=llm)  # `lopd cache repair`: the settings its manifest records
    assert repaired.repaired == {"00002": "checksum mismatch (truncated or modified)"} and not repaired.reused
    assert _checksums(read_manifest(set_url)) == _checksums(expected)
    assert verify(bucket_root) == (0, f"{expected['id']}: ok\n")
    hits = [r for r in read_rows(bucket_root) if r["stage"] == "score"]
    assert [r["cache_hit"] for r in hits] == [False, True, False]  # the ledger is in the bucket root

    other = ScoreConfig(k=4, rows_per_shard=8, logprob_dtype="float32")  # a new set, not a cache hit
    with pytest.raises(LopdError, match="must both be local or both in one bucket"):
        score(TEACHER, RolloutSet.open(local / "rollouts" / "r-bucket"), other, root=bucket_root, llm=llm, quiet=True)
    assert len(location.glob(bucket_root, "scores/*")) == 1  # refused before anything was written


def test_two_concurrent_scorers_leave_one_complete_set_and_two_ledger_rows(reference, bucket_root: str,
                                                                          tmp_path: Path):
    local, expected = reference
    _with_rollouts(local, bucket_root)
    score_concurrently(bucket_root, ["--teacher", TEACHER, "--rollouts", "r-bucket", *ARGS], tmp_path)
    check_one_complete_set(bucket_root, expected["id"], set(expected["shards"]))
