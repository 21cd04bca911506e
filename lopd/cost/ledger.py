"""Append-only cost ledger: one row per stage run, stored as one object per row under `<root>/ledger/`.

Stages of many experiments run as separate processes, on one machine or many, against one storage root that may
be a bucket, so appends must not lose rows and need no lock: each row is its own immutable object
(lopd.cost.store), and views of cost (amortisation, reports) are computed from the rows on read. Rows are never
updated or deleted.

Roots written before objects keep their rows in `<root>/ledger.sqlite` (SQLite with a `flock`ed set-up, unsafe on
network filesystems and impossible on a bucket). That file is read in place, read-only, before the object rows,
and never written again.

Every row has an outcome (`extra["outcome"]`): ok, failed (the stage raised) or killed (interrupted by a
signal). A stage killed with SIGKILL runs no code on its way out, so `record_stage` also keeps an open-run file
under `<root>/ledger.open/` while the stage runs, touched every HEARTBEAT_S; the next ledger read or stage finds the
files of processes that are gone and appends their rows as killed, ending at the last heartbeat. For a bucket root
the open-run files stay on the machine running the stage, in its mirror of the root (lopd.mirror): only that machine
can tell whether the process is gone, and only a local rename claims a file atomically.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from lopd.cost.store import get_rows, put_row
from lopd.errors import LopdError
from lopd.mirror import mirror_path
from lopd.storage import local_root, root_location

LEGACY_LEDGER = "ledger.sqlite"
OPEN_RUNS = "ledger.open"
HEARTBEAT_S = 15.0
OUTCOMES = ("ok", "failed", "killed")
FIELDS = ("experiment", "method", "stage", "artifact", "inputs", "started_at", "ended_at", "wall_seconds",
          "device_kind", "device_count", "device_seconds", "tokens", "cache_hit", "extra")


@lru_cache(maxsize=1)
def detect_devices() -> tuple[str, int]:
    """`("cuda:<GPU name>", visible GPUs)`, else `("cpu", cores this process may run on)`.

    Called after a stage's work, never before: `get_device_name` initialises CUDA in this process,
    which must not happen before vLLM decides how to start its workers. Memoised, since the devices
    of a process do not change.
    """
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}", torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "cpu", cores or torch.get_num_threads()


def _normalise(row: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and derived fields of an explicit row; reject what would corrupt the ledger."""
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise LopdError(f"unknown ledger field {unknown[0]!r}; fields are {', '.join(FIELDS)}")
    for key in ("experiment", "stage"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise LopdError(f"ledger row needs a non-empty {key!r} string")
    raw_inputs = row.get("inputs", ())
    inputs = [] if isinstance(raw_inputs, str) else list(raw_inputs)
    if isinstance(raw_inputs, str) or not all(isinstance(i, str) for i in inputs):
        raise LopdError(f"ledger field 'inputs' must be a list of artifact ids, got {raw_inputs!r}")
    if "device_kind" not in row or "device_count" not in row:
        row = {**dict(zip(("device_kind", "device_count"), detect_devices())), **row}

    started_at, ended_at, wall = (row.get(k) for k in ("started_at", "ended_at", "wall_seconds"))
    if wall is None:
        wall = ended_at - started_at if started_at is not None and ended_at is not None else 0.0
    if ended_at is None:
        ended_at = time.time() if started_at is None else started_at + wall
    if started_at is None:
        started_at = ended_at - wall
    kind, count = str(row["device_kind"]), int(row["device_count"])
    cache_hit = bool(row.get("cache_hit", False))
    # A cache hit produced nothing new, whatever the reuse itself took.
    device_seconds = 0.0 if cache_hit else float(row.get("device_seconds", wall * count))
    tokens = int(row.get("tokens", 0))
    if min(float(wall), device_seconds, tokens, count) < 0:
        raise LopdError("ledger row has a negative wall_seconds, device_seconds, device_count or tokens")
    return {
        "experiment": row["experiment"],
        "method": str(row.get("method", "")),
        "stage": row["stage"],
        "artifact": str(row.get("artifact", "")),
        "inputs": inputs,
        "started_at": float(started_at),
        "ended_at": float(ended_at),
        "wall_seconds": float(wall),
        "device_kind": kind,
        "device_count": count,
        "device_seconds": device_seconds,
        "tokens": tokens,
        "cache_hit": cache_hit,
        "extra": dict(row.get("extra") or {}),
    }


def append_row(root: str | os.PathLike | None, row: Mapping[str, Any]) -> dict[str, Any]:
    """Append one row and return it as stored (with its string `id`).

    Required: `experiment`, `stage`. Of started_at / ended_at / wall_seconds, missing ones follow
    from the others (wall 0 and "ended now" when absent); missing devices are `detect_devices()`;
    missing `device_seconds` is wall x device_count, and a cache hit is always 0.
    """
    stored = _normalise(row)
    stored["id"] = put_row(root, stored)
    stored["outcome"] = outcome_of(stored["extra"])
    return stored


def _legacy_rows(root: str | os.PathLike | None) -> list[dict[str, Any]]:
    """The rows of a pre-object `<root>/ledger.sqlite`, ids `ledger.sqlite:<rowid>`; `[]` when there is none.

    Opened read-only. Without a `-wal` file beside it, every row is in the main file and it is opened immutable,
    which creates no `-wal`/`-shm` files; a `-wal` left by a writer that crashed holds rows too, and is read through
    SQLite's read-only WAL mode.
    """
    local = local_root(root)
    path = (local / LEGACY_LEDGER).resolve() if local is not None else None
    if path is None or not path.is_file():
        return []
    mode = "mode=ro" if path.with_name(f"{path.name}-wal").exists() else "immutable=1"
    with closing(sqlite3.connect(f"{path.as_uri()}?{mode}", uri=True)) as con:
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM stages ORDER BY id")]
    for row in rows:
        row["id"] = f"{LEGACY_LEDGER}:{row['id']}"
        row["inputs"] = json.loads(row["inputs"])
        row["extra"] = json.loads(row["extra"])
        row["cache_hit"] = bool(row["cache_hit"])
    return rows


def read_rows(root: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Every row in append order, legacy SQLite rows first; `[]` when the root has no ledger (reading creates none)."""
    rows = _legacy_rows(root) + get_rows(root)
    for row in rows:
        row["outcome"] = outcome_of(row["extra"])
    return rows


def outcome_of(extra: Mapping[str, Any]) -> str:
    """ok, failed or killed; rows written before outcomes were recorded marked a failure by extra.failed."""
    return extra.get("outcome") or ("failed" if extra.get("failed") else "ok")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def reap_killed_runs(root: str | os.PathLike | None) -> int:
    """Append a killed row for every open run on this host whose process is gone; returns how many.

    A run's file is claimed by renaming it, so two readers reaping at once append its row once. A bucket root's
    stages killed on another machine are reaped by the next lopd command there.
    """
    directory = open_runs_dir(root)
    reaped = 0
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        host, pid, _ = path.stem.rsplit("_", 2)
        if host != os.uname().nodename or not _process_gone(int(pid)):
            continue
        claimed = path.with_suffix(".reaping")
        try:
            path.rename(claimed)
        except FileNotFoundError:  # another reader took it
            continue
        row = json.loads(claimed.read_text())
        last_seen = claimed.stat().st_mtime
        row["extra"] = dict(row.get("extra") or {}, outcome="killed", failed=True, error="killed (no exit ran)")
        append_row(root, {**row, "ended_at": last_seen, "wall_seconds": max(last_seen - row["started_at"], 0.0)})
        claimed.unlink()
        reaped += 1
    return reaped


def open_runs_dir(root: str | os.PathLike | None) -> Path:
    """The open-run files of this machine's stages: `<root>/ledger.open/`, for a bucket root in this machine's
    mirror of it (not created)."""
    return mirror_path(root_location(root)) / OPEN_RUNS


class _OpenRun:
    """The open-run file of one running stage, touched every HEARTBEAT_S by a daemon thread until closed."""

    def __init__(self, root: str | os.PathLike | None, record: "StageRecord", started_at: float):
        import threading
        import uuid

        directory = open_runs_dir(root)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.uname().nodename}_{os.getpid()}_{uuid.uuid4().hex[:8]}.json"
        row = {k: v for k, v in vars(record).items() if v is not None} | {"started_at": started_at}
        self.path.write_text(json.dumps(row, default=str))
        self.done = threading.Event()
        threading.Thread(target=self._beat, daemon=True, name="lopd-ledger-heartbeat").start()

    def _beat(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def close(self) -> None:
        self.done.set()
        self.path.unlink(missing_ok=True)


@dataclass
class StageRecord:
    """What a stage learns while it runs; set attributes inside `record_stage`'s block.

    `device_kind`/`device_count` left as None are detected on exit. Set `device_count` when the
    stage uses fewer devices than the process sees, and record from one rank only under DeepSpeed
    (with `device_count` = world size), or the cost is counted once per rank.
    """

    experiment: str
    stage: str
    method: str = ""
    artifact: str = ""
    inputs: list[str] = field(default_factory=list)
    tokens: int = 0
    cache_hit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    device_kind: str | None = None
    device_count: int | None = None


@contextmanager
def record_stage(
    root: str | os.PathLike | None,
    *,
    experiment: str,
    stage: str,
    method: str = "",
    artifact: str = "",
    inputs: Iterable[str] = (),
    tokens: int = 0,
    extra: Mapping[str, Any] | None = None,
    open_run: bool = True,
) -> Iterator[StageRecord]:
    """Time the block and append its row on exit.

    Cheap: one small write (milliseconds on a local root) and, once per process, `detect_devices()` (imports torch
    if the stage has not).

    A block that raises is still recorded, with `extra["failed"] = True`, `extra["error"]` the
    exception type and outcome "failed" ("killed" for Ctrl-C), because its device time was spent;
    amortisation charges it to the experiment like any other row. The exception is re-raised unchanged.
    A process killed outright is recorded later from its open-run file (`reap_killed_runs`);
    open_run=False is for a stage that leaves its own, more precise record of a killed attempt (`lopd train`'s
    checkpoint heartbeat knows which tokens a later attempt will not redo), so that such an attempt is not recorded
    twice.
    """
    reap_killed_runs(root)
    record = StageRecord(experiment, stage, method, artifact, list(inputs), tokens, extra=dict(extra or {}))
    started_at, start = time.time(), time.perf_counter()
    running = _OpenRun(root, record, started_at) if open_run else None
    outcome = "ok"
    try:
        yield record
    except BaseException as exc:
        outcome = "killed" if isinstance(exc, KeyboardInterrupt) else "failed"
        record.extra.update(failed=True, error=type(exc).__name__)
        raise
    finally:
        wall = time.perf_counter() - start
        record.extra["outcome"] = outcome
        row = {k: v for k, v in vars(record).items() if v is not None}
        append_row(root, {**row, "started_at": started_at, "ended_at": started_at + wall, "wall_seconds": wall})
        if running is not None:
            running.close()
