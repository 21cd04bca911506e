"""A storage root in a bucket (issue 18) on moto's S3 server: rollout sets committed by a conditional PUT, and the
whole smoke pipeline run with `--root s3://...`, verified, resumed from another machine's empty mirror, then its
student rollouts scored by two racing `lopd score` processes."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bucket_checks import REPO, check_one_complete_set, score_concurrently, verify
from child_env import finish, subprocess_env
from toy_sets import TEACHER, rollout_records

from lopd import location
from lopd.cost.ledger import read_rows
from lopd.errors import LopdError
from lopd.mirror import fetch, mirror_path, publish, writable_copy
from lopd.rollout_set import META, TABLE, RolloutSet, _commit_to_bucket, write_rollout_set

META_FIELDS = {"id": "r-b", "model": "toy"}


def test_a_rollout_set_in_a_bucket_reads_as_the_local_one(bucket_root: str, tmp_path: Path):
    records = rollout_records([[1.0, 0.0], [0.0, 1.0]])
    local = write_rollout_set(tmp_path / "r-b", records, META_FIELDS)
    stored = write_rollout_set(f"{bucket_root}/rollouts/r-b", records, META_FIELDS)
    opened = RolloutSet.open(f"{bucket_root}/rollouts/r-b")
    assert opened.meta["table"].startswith("attempts/") and opened.meta["table"].endswith(f"/{TABLE}")
    assert opened.table.equals(local.table) and opened.meta["content_digest"] == local.meta["content_digest"]
    assert [list(r) for r in opened.response_ids] == [list(r) for r in local.response_ids]
    with pytest.raises(LopdError, match="already holds a rollout set"):
        write_rollout_set(stored.path, records, META_FIELDS)


def test_of_two_writers_of_one_rollout_set_one_commits_and_the_other_leaves_nothing(bucket_root: str):
    """The second writer got past the existence check before the first committed: its conditional PUT of
    `meta.json` fails, it deletes its own table and returns the committed set."""
    path = f"{bucket_root}/rollouts/r-b"
    first = write_rollout_set(path, rollout_records([[1.0]]), META_FIELDS)
    table = pq.read_table(location.filesystem(first.table_location)[1], filesystem=location.filesystem(path)[0])
    second = _commit_to_bucket(path, table, dict(META_FIELDS, num_rows=1, num_response_tokens=0))
    assert second.meta == first.meta
    assert [location.basename(p) for p in location.glob(path, "attempts/*")] == [first.meta["table"].split("/")[1]]


def test_a_writer_killed_before_its_commit_leaves_no_rollout_set(bucket_root: str):
    path = f"{bucket_root}/rollouts/r-b"
    fs, key = location.filesystem(path)
    fs.pipe_file(f"{key}/attempts/0123456789ab/{TABLE}", b"half a table")  # uploaded, never committed
    with pytest.raises(LopdError, match="is not a rollout set"):
        RolloutSet.open(path)
    assert not location.is_file(location.join(path, META))


def test_a_model_published_by_one_machine_is_fetched_once_by_another(bucket_root: str, tmp_path: Path, monkeypatch):
    where = f"{bucket_root}/runs/p/seed0/sft"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    trained = writable_copy(where)
    for name, data in {"config.json": b"{}", "model.safetensors": b"w" * 100, "merged/config.json": b"{}",
                       "checkpoints/step-1/state.pt": b"optimizer"}.items():
        (trained / name).parent.mkdir(parents=True, exist_ok=True)
        (trained / name).write_bytes(data)
    assert publish(trained, where, exclude=["checkpoints"]) == where
    published = {relative for relative, _, _ in location.files(where)}
    assert published == {"config.json", "model.safetensors", "merged/config.json"}
    assert fetch(where) == trained and fetch(f"{where}/merged") == trained / "merged"  # already complete here

    for machine in ("b", "c"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / machine))
        stale = mirror_path(where)
        stale.mkdir(parents=True)
        (stale / "partial.bin").write_bytes(b"a download killed half way")  # no marker: not a copy
        copy = fetch(where)
        assert copy == stale and {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} == published
        assert (copy / "model.safetensors").read_bytes() == b"w" * 100

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    retrained = writable_copy(where)  # a rerun of the stage writes here: no longer the bucket's copy
    (retrained / "model.safetensors").write_bytes(b"half written")
    assert (fetch(where) / "model.safetensors").read_bytes() == b"w" * 100


def _lopd(args: list[str], env: dict[str, str], log: Path, timeout: float) -> str:
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lopd.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code = finish(proc, timeout=timeout)
    assert code == 0, log.read_text()[-3000:]
    return log.read_text()


@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_a_bucket_root(bucket_root: str, tmp_path: Path):
    """The bucket run makes the local run's sets (same ids: the same models were loaded) and evaluations; another
    machine sees it finished; two racing scorers of its rollouts leave one set and two ledger rows."""
    machine = subprocess_env() | {"PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "machine-a")}
    local = tmp_path / "local-root"
    _lopd(["run", "pipelines/smoke_toy.toml", "--root", str(local)], machine, tmp_path / "local.log", 1800)
    _lopd(["run", "pipelines/smoke_toy.toml", "--root", bucket_root], machine, tmp_path / "run.log", 1800)

    runs = f"{bucket_root}/runs/smoke_toy"
    state = json.loads(location.read_bytes(f"{runs}/seed0/state.json"))["stages"]
    results = json.loads(location.read_bytes(f"{runs}/results.json"))
    local_state = json.loads((local / "runs/smoke_toy/seed0/state.json").read_text())["stages"]
    local_results = json.loads((local / "runs/smoke_toy/results.json").read_text())
    def ids(stages: dict) -> dict[str, str | None]:
        return {stage: entry["output"].get("id") for stage, entry in stages.items()}

    assert ids(state) == ids(local_state)
    assert results["seeds"]["0"]["evals"] == local_results["seeds"]["0"]["evals"]
    for stage in ("teacher_sft_data", "student_rollouts", "teacher_more_data"):
        assert RolloutSet.open(state[stage]["output"]["path"]).id == state[stage]["output"]["id"]
    assert state["sft"]["output"]["path"] == f"{runs}/seed0/sft"  # the trained model, published to the bucket
    published = {relative for relative, _, _ in location.files(f"{runs}/seed0/sft")}
    assert {"model.safetensors", "config.json", "metrics.jsonl"} <= published
    assert not any(p.startswith("checkpoints/") for p in published)  # resumable state stays on the machine
    assert location.is_file(f"{runs}/results.png") and location.is_file(f"{runs}/seed0/eval.json")
    assert verify(bucket_root)[0] == 0
    assert Counter(r["stage"] for r in read_rows(bucket_root)) == Counter(r["stage"] for r in read_rows(local))

    # Another machine (an empty mirror) sees every stage finished from the bucket alone.
    other = machine | {"XDG_CACHE_HOME": str(tmp_path / "machine-b")}
    plan = _lopd(["run", "pipelines/smoke_toy.toml", "--root", bucket_root, "--dry-run"], other,
                 tmp_path / "plan.log", 300)
    assert plan.count("  reuse  ") == len(state) and "  run  " not in plan

    rollouts = state["student_rollouts"]["output"]["id"]
    score_concurrently(bucket_root, ["--teacher", TEACHER, "--rollouts", rollouts, "--k", "8",
                                     "--rows-per-shard", "32"], tmp_path)
    new = [r["artifact"] for r in read_rows(bucket_root) if r["stage"] == "score"][-1]
    check_one_complete_set(bucket_root, new, {f"{i:05d}" for i in range(4)})  # 128 rows: 4 shards
