"""Writing a score set under a bucket prefix, where neither `flock` nor an atomic directory rename exists.

The local protocol (lopd.cache.score_set) serialises writers with `flock` and publishes a shard by renaming its
staging directory. On an object store both are replaced by one primitive, the conditional PUT that creates an
object only if it is absent (S3's `If-None-Match: *`, lopd.location.create):

1. The first writer creates `manifest.json` (identity, empty shard table) if absent; later writers read it and
   must be making the same set.
2. A writer writes a shard under a name of its own, `shards/<shard>-<attempt>/`, and checksums it. Nothing
   points there yet, so a writer killed at this point leaves objects that no reader ever opens.
3. The commit is creating `commits/<shard>.json` (the shard's manifest entry, naming the attempt) if absent. Of
   two writers of one shard exactly one succeeds; the other deletes its own attempt. Readers fold commit records
   into the manifest's shard table (lopd.cache.score_set.read_manifest).
4. Whoever sees every shard committed rewrites `manifest.json` with the full shard table and `complete: true`;
   concurrent finishers write the same table.

There are no shard claims: two writers may compute the same shard (wasted work, never a corrupt set), which is
what `--shard i/N` assignment avoids in practice.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from lopd import location
from lopd.cache.score_set import (
    COMMITS,
    MANIFEST,
    ScoreSetWriter,
    ShardPlan,
    check_same_set,
    initial_manifest,
    read_manifest,
    shard_location,
    write_entry,
)
from lopd.errors import LopdError
from lopd.faults import crash_point
from lopd.location import Location
from lopd.storage import json_bytes


class BucketScoreSetWriter(ScoreSetWriter):
    """`ScoreSetWriter`'s interface (plan, pending, claim, commit, discard, finish) on a bucket prefix."""

    def __init__(self, path: Location, header: dict[str, Any], rows_per_shard: int):
        self.path = path
        self.rows_per_shard = rows_per_shard
        manifest = location.join(path, MANIFEST)
        created = False
        if not location.is_file(manifest):
            # Writers create the manifest before anything else, so objects listed before the manifest exists are
            # foreign; the second look keeps a writer that started just after another from refusing its objects.
            if location.glob(path, "*") and not location.is_file(manifest):
                raise LopdError(f"{path} is not empty and holds no score set; choose another --out")
            created = location.create(manifest, json_bytes(initial_manifest(header, rows_per_shard)))
        if not created:  # another writer made it first, now or earlier
            existing = self.manifest()
            check_same_set(path, existing, header)
            self.rows_per_shard = existing["rows_per_shard"]

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    @contextmanager
    def claim(self, plan: ShardPlan, wait: bool = False) -> Iterator[bool]:
        """True unless the shard is already committed; no lock is taken (the commit itself is exclusive)."""
        yield plan.name not in self.manifest()["shards"]

    def commit(self, plan: ShardPlan, arrays: dict[str, np.ndarray], stats: dict[str, Any] | None = None) -> None:
        """Write the shard under a fresh attempt name, then create its commit record if no writer did first."""
        attempt = uuid.uuid4().hex[:12]
        shard = shard_location(self.path, plan.name, {"attempt": attempt})

        def write_shard() -> bytes:
            entry = dict(write_entry(shard, plan, arrays, stats), attempt=attempt)
            crash_point("shard_staged")
            return json_bytes(entry)

        # A writer that loses leaves the shard to the one that committed first: its copy is the one readers use.
        location.commit_attempt(shard, location.join(self.path, COMMITS, f"{plan.name}.json"), write_shard)
        crash_point("shard_committed")

    def discard(self, names: list[str]) -> None:
        """Un-commit damaged shards and mark the set incomplete; their objects are left for a later clean-up."""
        if not names:
            return
        manifest = self.manifest()
        for name in names:
            location.remove(location.join(self.path, COMMITS, f"{name}.json"))
            manifest["shards"].pop(name, None)
        manifest["complete"] = False
        location.write_bytes(location.join(self.path, MANIFEST), json_bytes(manifest))

    def finish(self, num_rows: int, **fields: Any) -> dict[str, Any]:
        """Mark the set complete once every shard is committed; returns the manifest."""
        manifest = self.manifest()
        if {p.name for p in self.plan(num_rows)} <= set(manifest["shards"]):
            manifest.update(fields, complete=True, num_rows=num_rows)
            location.write_bytes(location.join(self.path, MANIFEST), json_bytes(manifest))
        return manifest


def score_set_writer(path: str | os.PathLike, header: dict[str, Any], rows_per_shard: int) -> ScoreSetWriter:
    """The writer for a score set at `path`: flock-based in a local directory, conditional PUTs on a bucket."""
    where = location.as_location(path)
    if location.is_bucket(where):
        return BucketScoreSetWriter(where, header, rows_per_shard)
    return ScoreSetWriter(where, header, rows_per_shard)
