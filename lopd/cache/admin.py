"""Maintenance of the score sets under a storage root: list, show, verify, garbage-collect, export.

Which experiments used a score set is read from the cost ledger (every stage that produced or consumed
an artifact recorded it), so the ledger doubles as the registry of experiments and `gc` never deletes
what an experiment references.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lopd.cache.reader import ScoreCache
from lopd.cache.score_set import MANIFEST, damaged_shards, read_manifest, scores_dir, shard_location
from lopd.cost.ledger import read_rows
from lopd.errors import LopdError
from lopd.location import (
    Location,
    as_location,
    basename,
    glob,
    is_bucket,
    is_file,
    join,
    modified,
    parent,
    remove,
    resolve,
)
from lopd.rollout_set import META, RolloutSet, rollouts_dir
from lopd.storage import find_artifact, read_json


def usage(root: Location) -> dict[str, set[str]]:
    """Artifact id -> experiments that produced or consumed it (from the ledger)."""
    used: dict[str, set[str]] = {}
    for row in read_rows(root):
        for artifact in [row["artifact"], *row["inputs"]]:
            if artifact:
                used.setdefault(artifact, set()).add(row["experiment"])
    return used


def entries(root: Location) -> list[dict[str, Any]]:
    """One summary per score set under the root (a local directory or a bucket), newest first."""
    used = usage(root)
    out = []
    for manifest_path in sorted(glob(scores_dir(root), f"*/{MANIFEST}")):
        manifest = read_manifest(parent(manifest_path))
        shards = manifest["shards"].values()
        size = sum(s["bytes"] for s in shards)
        positions = sum(s["positions"] for s in shards)
        out.append({
            "id": manifest["id"], "path": str(parent(manifest_path)), "complete": manifest.get("complete", False),
            "created": manifest.get("created"), "teacher": manifest["teacher"]["model"], "k": manifest["config"]["k"],
            "logprob_dtype": manifest["config"]["logprob_dtype"], "rollout_set": manifest["rollout_set"]["id"],
            "rows": manifest.get("num_rows"), "positions": positions, "bytes": size,
            "bytes_per_position": round(size / positions, 1) if positions else None,
            "experiments": sorted(used.get(manifest["id"], ())),
        })
    return sorted(out, key=lambda e: -(e["created"] or 0))


def find(root: Location, ref: str) -> Location:
    """A score set by path, full id, or unique id prefix."""
    return find_artifact(scores_dir(root), ref, MANIFEST, "score set")


def verify(path: Location) -> list[str]:
    """Problems found (empty when the score set is intact): missing or corrupt shards, a changed rollout set."""
    manifest = read_manifest(path)
    problems = []
    if not manifest.get("complete"):
        problems.append("incomplete: scoring was interrupted; rerun the same `lopd score`")
    problems += [f"shard {name}: {reason}" for name, reason in damaged_shards(path, manifest).items()]
    rollout_path = resolve(join(path, manifest["rollout_set"]["path"]))
    try:
        rollouts = RolloutSet.open(rollout_path)
        if rollouts.meta.get("content_digest") != manifest["rollout_set"]["content_digest"]:
            problems.append(f"rollout set {rollouts.id}: content differs from what was scored")
    except LopdError:
        problems.append(f"rollout set {manifest['rollout_set']['id']}: missing at {rollout_path}")
    return problems


def garbage(root: Location) -> list[Location]:
    """Score sets and rollout sets no experiment references (and that no kept score set needs)."""
    used = usage(root)
    sets = entries(root)
    doomed = [as_location(e["path"]) for e in sets if not e["experiments"]]
    kept_rollouts = {e["rollout_set"] for e in sets if e["experiments"]}
    for meta in sorted(glob(rollouts_dir(root), "*/meta.json")):
        rollout_id = read_json(meta)["id"]
        if rollout_id not in used and rollout_id not in kept_rollouts:
            doomed.append(parent(meta))
    return doomed


ATTEMPTS_OLDER_THAN_HOURS = 24.0
SHARD_ATTEMPT = re.compile(r"\d+-[0-9a-f]+")  # `shards/<shard>-<attempt>/` of a bucket writer (lopd.cache.bucket_set)


def _newest(base: Location, middle: str) -> dict[tuple[str, str], float]:
    """(set id, attempt name) -> time of the newest object under `base/<id>/<middle>/<attempt>/`, from one listing."""
    newest: dict[tuple[str, str], float] = {}
    for relative, stamp in modified(base).items():
        parts = relative.split("/")
        if len(parts) > 3 and parts[1] == middle:
            key = (parts[0], parts[2])
            newest[key] = max(newest.get(key, stamp), stamp)
    return newest


def orphaned_attempts(root: Location, older_than_hours: float) -> list[Location]:
    """Write attempts under a bucket root that no commit names and whose newest object is older than the threshold.

    A bucket writer uploads under a name of its own and then commits it with a create-if-absent PUT: a score set
    shard under `shards/<shard>-<attempt>/`, named by its commit record (lopd.cache.bucket_set); a rollout set's
    table under `attempts/<attempt>/`, named by `meta.json`'s `table`. A writer killed between upload and commit, or
    a shard discarded as damaged, leaves objects no reader opens, inside sets that whole-set gc keeps. A writer still
    uploading looks just the same, hence the age threshold: an attempt idle for less is never taken. The listing is
    taken before the commits are read, so an attempt committed meanwhile counts as committed. A local root has none
    (its writers stage under `.staging*` and hold flocks)."""
    if not is_bucket(root):
        return []
    cutoff = time.time() - older_than_hours * 3600
    orphans: list[Location] = []
    shards = _newest(scores_dir(root), "shards")
    for set_id in sorted({set_id for set_id, _ in shards}):
        path = join(scores_dir(root), set_id)
        if not is_file(join(path, MANIFEST)):
            continue  # writers create the manifest before any shard: without one, these objects are not lopd's
        entries = read_manifest(path)["shards"].items()
        committed = {basename(shard_location(path, name, entry)) for name, entry in entries}
        orphans += [join(path, "shards", name) for (owner, name), newest in shards.items()
                    if owner == set_id and SHARD_ATTEMPT.fullmatch(name) and name not in committed and newest <= cutoff]
    tables = _newest(rollouts_dir(root), "attempts")
    for rollout_id in sorted({rollout_id for rollout_id, _ in tables}):
        path = join(rollouts_dir(root), rollout_id)
        meta = join(path, META)
        table = read_json(meta).get("table", "") if is_file(meta) else ""  # no meta.json: no attempt committed
        orphans += [join(path, "attempts", name) for (owner, name), newest in tables.items()
                    if owner == rollout_id and not table.startswith(f"attempts/{name}/") and newest <= cutoff]
    return sorted(orphans, key=str)


def collect(root: Location, dry_run: bool,
            attempts_older_than_hours: float = ATTEMPTS_OLDER_THAN_HOURS) -> list[Location]:
    """Remove (or with `dry_run` only list) the unreferenced sets `garbage` finds and, on a bucket root, the orphaned
    write attempts inside the sets it keeps (`orphaned_attempts`)."""
    doomed = garbage(root)
    gone = {str(path) for path in doomed}
    doomed += [attempt for attempt in orphaned_attempts(root, attempts_older_than_hours)
               if str(parent(parent(attempt))) not in gone]
    if not dry_run:
        for path in doomed:
            if is_bucket(path):
                remove(path)
            else:
                shutil.rmtree(path)
    return doomed


def export_parquet(path: Location, out: Path) -> Path:
    """One row per sequence with list columns, for use outside lopd (pandas, polars, DuckDB)."""
    cache = ScoreCache(path)
    columns: dict[str, list] = {name: [] for name in (
        "row", "group_id", "reward", "prompt_ids", "response_ids", "behaviour_logprobs", "teacher_logprobs",
        "topk_ids", "topk_logprobs", "tail_logprob")}
    for i in range(len(cache)):
        seq = cache[i]
        columns["row"].append(i)
        columns["group_id"].append(seq.group_id)
        columns["reward"].append(seq.reward)
        for name in ("prompt_ids", "response_ids", "behaviour_logprobs", "teacher_logprobs", "tail_logprob"):
            columns[name].append(np.asarray(getattr(seq, name)).tolist())
        columns["topk_ids"].append(seq.topk_ids.astype(np.int64).tolist())
        columns["topk_logprobs"].append(seq.topk_logprobs.astype(np.float32).tolist())
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out, compression="zstd")
    return out
