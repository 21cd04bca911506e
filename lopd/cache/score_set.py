"""Writing a score set crash-safely: per-shard staging, atomic rename, and a manifest that is the commit record.

Protocol (see docs/cache-format.md):
1. The first writer creates `manifest.json` with the score set's identity and an empty shard table.
2. A writer takes a shard by holding `locks/<shard>.lock` (flock, non-blocking): one writer per shard,
   so `--shard i/N` processes and accidental duplicates cooperate instead of corrupting each other.
3. It writes the shard under `.staging/`, checksums it, renames it into `shards/`, then records it in the
   manifest under `locks/manifest.lock`. A shard directory missing from the manifest is a crash leftover
   and is rewritten. Killing a writer at any point loses at most the shards it had not committed.

This is the protocol of a local (or network-mounted) directory. Under a bucket prefix, where neither flock nor
rename exists, lopd.cache.bucket_set commits by create-if-absent PUTs instead; the readers here handle both.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lopd.cache.layout import FORMAT_VERSION, shard_bytes, shard_checksum, write_shard
from lopd.errors import LopdError
from lopd.faults import crash_point
from lopd.location import Location, basename, glob, is_bucket, is_dir, join
from lopd.storage import read_json, write_json_atomic

MANIFEST = "manifest.json"
COMMITS = "commits"  # a bucket writer's shard commit records, `commits/<shard>.json` (lopd.cache.bucket_set)


def read_manifest(path: Location) -> dict[str, Any]:
    """The manifest of the score set at `path`. On a bucket, shards committed since the manifest was last written
    (each by a create-if-absent commit record, lopd.cache.bucket_set) are folded into its shard table."""
    manifest = read_json(join(path, MANIFEST))
    if is_bucket(path):
        for record in glob(join(path, COMMITS), "*.json"):
            shard = basename(record).removesuffix(".json")
            if shard not in manifest["shards"]:
                manifest["shards"][shard] = read_json(record)
    return manifest


def damaged_shards(path: Location, manifest: dict[str, Any]) -> dict[str, str]:
    """Committed shards of the set at `path` (local or in a bucket) whose directory is gone or whose bytes no longer
    match their checksum, with the reason; what `lopd cache verify` reports and a rerun of `lopd score` rescores."""
    damaged = {}
    for shard, entry in sorted(manifest["shards"].items()):
        shard_dir = shard_location(path, shard, entry)
        if not is_dir(shard_dir):
            damaged[shard] = "missing"
        elif shard_checksum(shard_dir) != entry["checksum"]:
            damaged[shard] = "checksum mismatch (truncated or modified)"
    return damaged


def scores_dir(root: Location) -> Location:
    return join(root, "scores")


def shard_location(path: Location, shard: str, entry: dict[str, Any] | None = None) -> Location:
    """Where shard `shard` of the score set at `path` lies: `shards/<shard>`, or for a shard a bucket writer
    committed, `shards/<shard>-<attempt>` with the attempt its manifest entry names (lopd.cache.bucket_set)."""
    attempt = (entry or {}).get("attempt")
    return join(path, "shards", f"{shard}-{attempt}" if attempt else shard)


def initial_manifest(header: dict[str, Any], rows_per_shard: int) -> dict[str, Any]:
    """What the first writer of a score set records: its identity and an empty shard table."""
    return dict(header, format_version=FORMAT_VERSION, rows_per_shard=rows_per_shard, shards={}, complete=False,
                created=time.time())


def check_same_set(path: Location, existing: dict[str, Any], header: dict[str, Any]) -> None:
    """A writer resuming the set at `path` must be making the same set (same id)."""
    if existing.get("id") != header["id"]:
        raise LopdError(f"{path} already holds a different score set ({existing.get('id')}); "
                        f"choose another --out or remove it")


def shard_name(index: int) -> str:
    return f"{index:05d}"


@contextmanager
def _flock(path: Path, blocking: bool) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def refuse_foreign(path: Path) -> None:
    """Refuse a directory that holds no score set but other files. What writers themselves leave before the
    manifest exists (locks, staging, the manifest's temporary file) is not foreign, so concurrent first writers
    of one set never refuse each other."""
    if not path.is_dir() or (path / MANIFEST).is_file():
        return
    ours = ("locks", ".staging")
    if any(p.name not in ours and not p.name.startswith(f".{MANIFEST}.") for p in path.iterdir()):
        raise LopdError(f"{path} is not empty and holds no score set; choose another --out")


def write_entry(where: Location, plan: ShardPlan, arrays: dict[str, np.ndarray],
                stats: dict[str, Any] | None) -> dict[str, Any]:
    """Write the shard's arrays at `where` and return its manifest entry (rows, positions, checksum, bytes)."""
    write_shard(where, arrays)
    return {"rows": [plan.start, plan.stop], "positions": int(arrays["sampled_logprob"].shape[0]),
            "checksum": shard_checksum(where), "bytes": shard_bytes(where), **(stats or {})}


@dataclass(frozen=True)
class ShardPlan:
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return shard_name(self.index)


class ScoreSetWriter:
    """Creates or resumes the score set at `path` whose identity is `header` (must include `id`)."""

    def __init__(self, path: Path, header: dict[str, Any], rows_per_shard: int):
        self.path = Path(path)
        self.rows_per_shard = rows_per_shard
        refuse_foreign(self.path)  # before the first lock file: a refused directory is left as it was
        self.path.mkdir(parents=True, exist_ok=True)
        with self._manifest_lock():
            manifest_path = self.path / MANIFEST
            if manifest_path.is_file():
                existing = read_json(manifest_path)
                check_same_set(self.path, existing, header)
                self.rows_per_shard = existing["rows_per_shard"]
            else:
                write_json_atomic(manifest_path, initial_manifest(header, rows_per_shard))

    def manifest(self) -> dict[str, Any]:
        return read_json(self.path / MANIFEST)

    def plan(self, num_rows: int, shard_of: tuple[int, int] = (0, 1)) -> list[ShardPlan]:
        """Every shard of the set, or those assigned to worker i of N (`--shard i/N`: shard index % N == i)."""
        worker, workers = shard_of
        plans = []
        for index, start in enumerate(range(0, num_rows, self.rows_per_shard)):
            if index % workers == worker:
                plans.append(ShardPlan(index, start, min(start + self.rows_per_shard, num_rows)))
        return plans

    def pending(self, plans: list[ShardPlan]) -> list[ShardPlan]:
        done = self.manifest()["shards"]
        return [p for p in plans if p.name not in done]

    @contextmanager
    def claim(self, plan: ShardPlan, wait: bool = False) -> Iterator[bool]:
        """Hold the shard's lock; yields False when another writer holds it or it is already committed."""
        with _flock(self.path / "locks" / f"{plan.name}.lock", blocking=wait) as got:
            if got and plan.name in self.manifest()["shards"]:
                got = False
            if got:  # clear what a killed writer of this shard may have left
                shutil.rmtree(self.path / "shards" / plan.name, ignore_errors=True)
                for leftover in (self.path / ".staging").glob(f"{plan.name}-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
            yield got

    def commit(self, plan: ShardPlan, arrays: dict[str, np.ndarray], stats: dict[str, Any] | None = None) -> None:
        """Stage, checksum, rename, record. Call only inside `claim(plan)` that yielded True."""
        staging = self.path / ".staging" / f"{plan.name}-{uuid.uuid4().hex[:8]}"
        try:
            entry = write_entry(staging, plan, arrays, stats)
            crash_point("shard_staged")
            final = self.path / "shards" / plan.name
            final.parent.mkdir(exist_ok=True)
            staging.rename(final)
            crash_point("shard_renamed")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with self._manifest_lock():
            manifest = self.manifest()
            manifest["shards"][plan.name] = entry
            write_json_atomic(self.path / MANIFEST, manifest)
        crash_point("shard_committed")

    def discard(self, names: list[str]) -> None:
        """Un-commit damaged shards (and mark the set incomplete) so that `pending` offers them again; the shard
        directories themselves are cleared by whoever claims them next."""
        if not names:
            return
        with self._manifest_lock():
            manifest = self.manifest()
            for name in names:
                manifest["shards"].pop(name, None)
            manifest["complete"] = False
            write_json_atomic(self.path / MANIFEST, manifest)

    def finish(self, num_rows: int, **fields: Any) -> dict[str, Any]:
        """Mark the set complete once every shard is committed; returns the manifest."""
        with self._manifest_lock():
            manifest = self.manifest()
            expected = {p.name for p in self.plan(num_rows)}
            if expected <= set(manifest["shards"]):
                manifest.update(fields, complete=True, num_rows=num_rows)
                write_json_atomic(self.path / MANIFEST, manifest)
            return manifest

    def _manifest_lock(self):
        return _flock(self.path / "locks" / "manifest.lock", blocking=True)
