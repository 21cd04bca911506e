"""The cost ledger as one object per row: concurrent writers on a local root and on an S3 server, `file://` roots,
and an old `ledger.sqlite` read in place.

Issue 18: the ledger must work when several machines write at once and when the storage root is a bucket. The S3
server is moto's, started here as a subprocess on a free port, and reached through the standard AWS environment
variables only, as a user's bucket would be. No engine starts here.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

from click.testing import CliRunner

from lopd.cli import main
from lopd.cost.ledger import append_row, read_rows, record_stage
from lopd.cost.store import ROW_NAME

CPU = {"device_kind": "cpu", "device_count": 1}

# The table every lopd before the object ledger wrote to `<root>/ledger.sqlite` (copied from its lopd/cost/ledger.py).
OLD_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS stages (id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL, "
    "method TEXT NOT NULL, stage TEXT NOT NULL, artifact TEXT NOT NULL, inputs TEXT NOT NULL, started_at REAL NOT NULL, "
    "ended_at REAL NOT NULL, wall_seconds REAL NOT NULL, device_kind TEXT NOT NULL, device_count INTEGER NOT NULL, "
    "device_seconds REAL NOT NULL, tokens INTEGER NOT NULL, cache_hit INTEGER NOT NULL, extra TEXT NOT NULL)"
)
OLD_INSERT = ("INSERT INTO stages (experiment, method, stage, artifact, inputs, started_at, ended_at, wall_seconds, "
              "device_kind, device_count, device_seconds, tokens, cache_hit, extra) VALUES "
              "(?, '', ?, ?, ?, 0.0, 10.0, 10.0, 'cpu', 1, 10.0, ?, 0, ?)")


def _append_many(root: str, writer: int, count: int, start) -> None:
    start.wait()  # every writer's first append hits the same fresh root at once
    for i in range(count):
        append_row(root, {"experiment": f"w{writer}", "stage": "train", "tokens": i, **CPU})


def _write_concurrently(root: str, writers: int, count: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(writers)
    workers = [ctx.Process(target=_append_many, args=(root, w, count, start)) for w in range(writers)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
        assert p.exitcode == 0


def _assert_all_rows(rows: list[dict], writers: int, count: int) -> None:
    """Every row once, in append order: ids ascending, and each writer's rows in the order it wrote them."""
    assert len(rows) == writers * count and len({r["id"] for r in rows}) == writers * count
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for w in range(writers):
        assert [r["tokens"] for r in rows if r["experiment"] == f"w{w}"] == list(range(count))


def test_concurrent_local_writers_lose_and_double_no_row(tmp_path: Path):
    """Before: SQLite rows serialised by `flock`, unsafe on a network filesystem. Now each row is its own object."""
    _write_concurrently(str(tmp_path), writers=8, count=25)
    _assert_all_rows(read_rows(tmp_path), 8, 25)
    names = os.listdir(tmp_path / "ledger")
    assert len(names) == 200 and all(ROW_NAME.match(n) for n in names)  # no temporary file left behind


def test_temporary_and_foreign_files_are_not_rows(tmp_path: Path):
    row = append_row(tmp_path, {"experiment": "A", "stage": "eval", **CPU})
    assert isinstance(row["id"], str) and (tmp_path / "ledger" / f"{row['id']}.json").is_file()
    (tmp_path / "ledger" / f".{row['id']}x.json.1a2b3c4d.tmp").write_text('{"experiment": "half')  # a writer mid-row
    (tmp_path / "ledger" / "notes.txt").write_text("not a row")
    assert [r["id"] for r in read_rows(tmp_path)] == [row["id"]]


def test_file_url_root_is_the_local_directory(tmp_path: Path):
    url = f"file://{tmp_path}"
    with record_stage(url, experiment="A", stage="score", artifact="S") as rec:
        rec.device_kind, rec.device_count = "cpu", 1
        assert len(list((tmp_path / "ledger.open").iterdir())) == 1  # a local root keeps open-run heartbeats
    append_row(tmp_path, {"experiment": "B", "stage": "eval", **CPU})
    assert read_rows(url) == read_rows(tmp_path) and [r["experiment"] for r in read_rows(url)] == ["A", "B"]
    summary = json.loads(CliRunner().invoke(main, ["cost", "--root", url, "--by", "experiment", "--json"],
                                            catch_exceptions=False).output)
    assert [r["experiment"] for r in summary["rows"]] == ["A", "B"]


def _old_ledger(path: Path, rows: list[tuple]) -> sqlite3.Connection:
    """An old-format ledger as lopd wrote it (WAL mode), its rows inserted; the connection is left open."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute(OLD_SCHEMA)
    for experiment, stage, artifact, inputs, tokens, extra in rows:
        con.execute(OLD_INSERT, (experiment, stage, artifact, json.dumps(inputs), tokens, json.dumps(extra)))
    return con


def test_old_sqlite_ledger_is_read_in_place_and_never_written(tmp_path: Path):
    old = tmp_path / "ledger.sqlite"
    _old_ledger(old, [("A", "score", "S", ["R"], 5, {}), ("A", "train", "", ["S"], 7, {"outcome": "failed"})]).close()
    before = (old.read_bytes(), old.stat().st_mtime_ns, sorted(os.listdir(tmp_path)))

    append_row(tmp_path, {"experiment": "B", "stage": "eval", **CPU})
    rows = read_rows(tmp_path)
    assert [r["id"] for r in rows[:2]] == ["ledger.sqlite:1", "ledger.sqlite:2"]
    assert [(r["experiment"], r["inputs"], r["tokens"], r["cache_hit"], r["outcome"]) for r in rows] == [
        ("A", ["R"], 5, False, "ok"), ("A", ["S"], 7, False, "failed"), ("B", [], 0, False, "ok")]
    after = (old.read_bytes(), old.stat().st_mtime_ns, sorted(set(os.listdir(tmp_path)) - {"ledger"}))
    assert after == before  # same bytes, same mtime, and no -wal/-shm files made beside it
    summary = json.loads(CliRunner().invoke(main, ["cost", "--root", str(tmp_path), "--by", "experiment", "--json"],
                                            catch_exceptions=False).output)
    assert [r["experiment"] for r in summary["rows"]] == ["A", "B"]


def test_old_sqlite_ledger_rows_still_in_its_wal_are_read(tmp_path: Path):
    """A writer that crashed leaves rows in `ledger.sqlite-wal` that the main file does not hold yet."""
    con = _old_ledger(tmp_path / "ledger.sqlite", [("A", "score", "S", ["R"], 5, {})])
    try:
        assert (tmp_path / "ledger.sqlite-wal").is_file()
        assert [r["id"] for r in read_rows(tmp_path)] == ["ledger.sqlite:1"]
    finally:
        con.close()


def test_concurrent_writers_on_a_bucket_and_lopd_cost_reads_them(bucket_root: str, tmp_path: Path):
    assert read_rows(bucket_root) == []  # no ledger yet: nothing listed, nothing created
    _write_concurrently(bucket_root, writers=4, count=10)
    rows = read_rows(bucket_root)
    _assert_all_rows(rows, 4, 10)

    import boto3

    bucket = bucket_root.removeprefix("s3://").split("/")[0]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == sorted(f"prefix/ledger/{r['id']}.json" for r in rows)

    with record_stage(bucket_root, experiment="w0", stage="eval", extra={"accuracy": 0.5}) as rec:
        rec.device_kind, rec.device_count = "cpu", 1  # a bucket root keeps no open-run file
    assert read_rows(bucket_root)[-1]["extra"] == {"accuracy": 0.5, "outcome": "ok"}

    result = CliRunner().invoke(main, ["cost", "--root", bucket_root, "--by", "experiment", "--json"],
                                catch_exceptions=False)
    summary = json.loads(result.output)
    assert [r["experiment"] for r in summary["rows"]] == ["w0", "w1", "w2", "w3"]
    assert summary["rows"][0]["accuracy"] == 0.5
    text = CliRunner().invoke(main, ["cost", "--root", bucket_root], catch_exceptions=False).output
    assert "CPU core-hours" in text

    out = tmp_path / "report.md"
    CliRunner().invoke(main, ["report", "--root", bucket_root, "--out", str(out)], catch_exceptions=False)
    assert f"# lopd report: `{bucket_root}`" in out.read_text()


def test_bucket_root_is_refused_in_one_line_where_not_supported(bucket_root: str):
    for args, needle in [(["demo"], "lopd demo does not yet accept a bucket root"),
                         (["report"], "pass --out FILE"),
                         (["train", "--student", "x", "--loss", "sft", "--rollouts", "r", "--out", f"{bucket_root}/ckpt"],
                          "training writes its checkpoints to a directory on this machine")]:
        result = CliRunner().invoke(main, [*args, "--root", bucket_root], prog_name="lopd")
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr
        assert bucket_root in lines[0]


def test_a_stage_killed_on_a_bucket_root_is_recorded_by_the_next_command_on_its_machine(bucket_root: str,
                                                                                        tmp_path: Path, monkeypatch):
    """The open-run file stays in this machine's mirror of the bucket root; the next ledger read here appends the
    killed row to the bucket, once."""
    import subprocess
    import sys

    script = ("import os, signal, time; from lopd.cost.ledger import record_stage\n"
              "with record_stage(os.environ['ROOT'], experiment='B', stage='score') as rec:\n"
              "    rec.device_kind, rec.device_count = 'cpu', 1\n"
              "    time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)\n")
    machine = {**os.environ, "ROOT": bucket_root, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert subprocess.run([sys.executable, "-c", script], env=machine).returncode == -9
    assert read_rows(bucket_root) == [] and list((tmp_path / "xdg" / "lopd" / "buckets").rglob("ledger.open/*.json"))

    monkeypatch.setenv("XDG_CACHE_HOME", machine["XDG_CACHE_HOME"])
    summary = json.loads(CliRunner().invoke(main, ["cost", "--root", bucket_root, "--json"],
                                            catch_exceptions=False).output)
    assert [(u["outcome"], u["experiment"], u["stage"]) for u in summary["unfinished"]] == [("killed", "B", "score")]
    CliRunner().invoke(main, ["cost", "--root", bucket_root], catch_exceptions=False)
    rows = read_rows(bucket_root)
    assert [(r["outcome"], r["extra"]["error"]) for r in rows] == [("killed", "killed (no exit ran)")]
