"""Two `lopd score` processes racing to write one score set into a bucket, and what must hold afterwards
(tests/test_score_bucket.py on a copied rollout set, tests/test_pipeline_bucket.py on a pipeline's)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from child_env import finish, subprocess_env
from click.testing import CliRunner

from lopd import location
from lopd.cache.score_set import COMMITS, MANIFEST
from lopd.cli import main
from lopd.cost.ledger import read_rows

REPO = Path(__file__).resolve().parents[1]


def verify(bucket_root: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["cache", "verify", "--root", bucket_root], prog_name="lopd")
    return result.exit_code, result.stdout


def score_concurrently(bucket_root: str, score_args: list[str], logs: Path) -> None:
    """Start two `lopd score --root <bucket> ARGS` together (each in its own session, so its engine processes are
    reaped with it): both race for every shard. Both must succeed."""
    env = subprocess_env() | {"PYTHONPATH": str(REPO)}
    paths = [logs / f"score{i}.log" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "lopd.cli", "score", *score_args, "--root", bucket_root],
                              env=env, stdout=path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
             for path in paths]
    codes = [finish(proc, timeout=600) for proc in procs]
    assert codes == [0, 0], "\n".join(path.read_text()[-2000:] for path in paths)


def check_one_complete_set(bucket_root: str, set_id: str, shards: set[str]) -> None:
    """The racers left one complete, verified set whose manifest names exactly `shards`, one commit record per shard
    and no attempt but the committed ones (a loser deletes its copy; none is ever referenced), and exactly one
    ledger row each: none lost, none doubled."""
    set_url = f"{bucket_root}/scores/{set_id}"
    stored = json.loads(location.read_bytes(f"{set_url}/{MANIFEST}"))  # the manifest object itself, no folding
    assert stored["complete"] and set(stored["shards"]) == shards
    records = {location.basename(p).removesuffix(".json"): json.loads(location.read_bytes(p))
               for p in location.glob(f"{set_url}/{COMMITS}", "*.json")}
    assert records == stored["shards"]
    committed = {f"{name}-{entry['attempt']}" for name, entry in stored["shards"].items()}
    assert {location.basename(p) for p in location.glob(f"{set_url}/shards", "*")} == committed
    code, out = verify(bucket_root)
    assert code == 0 and f"{set_id}: ok\n" in out, out

    rows = [r for r in read_rows(bucket_root) if r["stage"] == "score" and r["artifact"] == set_id]
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 2
    assert all(r["extra"]["outcome"] == "ok" for r in rows)
