"""Stages on Ray replicas (lopd.replicas), on a local Ray cluster of 2 CPUs with two replicas of the toy models.

`lopd score`: one replica's actor is killed mid-run; Ray restarts it and retries its shard, and the score set is
the one a one-process run makes: the same id and the same bytes in every shard (their checksums). `lopd rollout`
and `lopd eval`: the replicas sample what one engine samples on the toy models (seeds follow each prompt's
position; vLLM does not promise batch-invariant arithmetic, so at larger scale long samples may differ: docs/cluster.md),
also with an S3 storage root (moto), where the replicas commit score shards through the bucket protocol."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

import pytest
from toy_sets import TEACHER, make_rollout_set, rollout_records

from lopd.cache.score_set import MANIFEST, read_manifest
from lopd.evaluate import evaluate
from lopd.replicas import RayPlacement
from lopd.rollout import SamplingConfig, rollout
from lopd.rollout_set import RolloutSet
from lopd.score import ScoreConfig, score
from lopd.storage import read_json
from lopd.toy import TEACHER_B_DIR
from lopd.toy.words import make_prompts

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="pip install 'lopd[ray]'")
CONFIG = ScoreConfig(k=8, rows_per_shard=6)


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory) -> RolloutSet:
    path = tmp_path_factory.mktemp("ray-rollouts") / "r-ray"
    return make_rollout_set(path, rollout_records([[1.0, 0.0, 1.0, 0.0]] * 12))  # 48 rows: 8 shards of 6


def kill_one_replica_after_first_commit(path, killed: list[str]) -> None:
    """Once the set has a committed shard, kill replica 0's actor (Ray restarts it: `max_restarts`)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        manifest = path / MANIFEST
        if manifest.is_file() and read_json(manifest)["shards"]:
            for name in ray.util.list_named_actors():
                if name.endswith("-0") and name.startswith("lopd-score-"):
                    ray.kill(ray.get_actor(name), no_restart=False)
                    killed.append(name)
                    return
        time.sleep(0.2)


def test_two_replicas_with_one_killed_make_the_one_process_set_bit_for_bit(rollouts, tmp_path):
    single = score(TEACHER, rollouts, CONFIG, root=tmp_path / "single", quiet=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        target = tmp_path / "ray" / "scores" / single.id
        killed: list[str] = []
        killer = threading.Thread(target=kill_one_replica_after_first_commit, args=(target, killed), daemon=True)
        killer.start()
        replicated = score(TEACHER, rollouts, CONFIG, root=tmp_path / "ray", quiet=True,
                           placement=RayPlacement(replicas=2))
        killer.join(timeout=1)
    finally:
        ray.shutdown()
    assert killed, "the test never killed a replica: the run finished before its first commit was seen"
    assert replicated.id == single.id and replicated.complete
    one, two = read_json(single.path / MANIFEST), read_json(replicated.path / MANIFEST)
    assert len(one["shards"]) == 8
    assert {name: entry["checksum"] for name, entry in two["shards"].items()} == {
        name: entry["checksum"] for name, entry in one["shards"].items()}
    assert not list((replicated.path / ".staging").glob("*"))


def test_rollout_eval_and_score_on_two_replicas_into_a_bucket_match_one_engine(tmp_path, bucket_root: str):
    """The replicas' rollout set and score set written to an S3 root (the driver writes rollouts, each replica
    commits its score shards through the bucket protocol) are those one engine writes to a local root."""
    prompts = [asdict(prompt) for prompt in make_prompts("eval", 24)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=3)
    verifier = "lopd.toy.words:verify"
    teacher_b = str(TEACHER_B_DIR)
    single, _ = rollout(teacher_b, prompts, sampling, root=tmp_path / "single", verifier=verifier, quiet=True)
    alone = evaluate(teacher_b, prompts, verifier, sampling)
    single_scores = score(TEACHER, single, CONFIG, root=tmp_path / "single", quiet=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # its workers inherit the AWS variables
    try:
        placement = RayPlacement(replicas=2)
        replicated, _ = rollout(teacher_b, prompts, sampling, root=bucket_root, verifier=verifier, quiet=True,
                                placement=placement)
        together = evaluate(teacher_b, prompts, verifier, sampling, placement=placement)
        replicated_scores = score(TEACHER, replicated, CONFIG, root=bucket_root, quiet=True, placement=placement)
    finally:
        ray.shutdown()
    assert replicated.path == f"{bucket_root}/rollouts/{single.id}"
    assert replicated.meta["content_digest"] == single.meta["content_digest"]
    assert together == alone
    assert replicated_scores.id == single_scores.id and replicated_scores.complete
    one, two = read_manifest(single_scores.path), read_manifest(replicated_scores.path)
    assert {name: entry["checksum"] for name, entry in two["shards"].items()} == {
        name: entry["checksum"] for name, entry in one["shards"].items()}
