"""Rollout sets: one Parquet table plus `meta.json`, committed atomically.

Row i of the table is sequence i of every score set attached to the rollout set; nothing is ever
re-tokenised after rollout, so the token ids stored here are exactly what teachers score and students train on.

In a local directory the set is staged beside its final name and committed by a directory rename. On a bucket
(lopd.location), where no rename exists, each writer uploads its table under `attempts/<attempt>/` and commits by
creating `meta.json`, which names that table, if absent (a conditional PUT): of two writers of one set exactly one
commits, and a writer killed before its commit leaves a table no `meta.json` points at (`lopd cache gc` removes it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lopd import location
from lopd.errors import LopdError
from lopd.fingerprint import file_digest
from lopd.location import Location, as_location, filesystem, is_bucket, is_file, join
from lopd.storage import json_bytes, read_json, write_json_atomic

TABLE = "rollouts.parquet"
META = "meta.json"

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("group_id", pa.int64()),
        ("sample_index", pa.int32()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("behaviour_logprobs", pa.list_(pa.float32())),
        ("finish_reason", pa.string()),
        ("reward", pa.float32()),
        # [start, end) response positions the model generated itself; observation tokens a tool environment
        # inserted lie between spans. Absent (older sets) or null: the whole response, [[0, len]].
        ("step_spans", pa.list_(pa.list_(pa.int32()))),
        ("rubric_reward", pa.float32()),  # a judge's rubric score in [0, 1]; null without --judge
    ]
)


def rollouts_dir(root: Location) -> Location:
    return join(root, "rollouts")


@dataclass
class RolloutSet:
    """A committed rollout set, in a local directory or under a bucket prefix (`path` is a lopd.location);
    columns are read lazily and kept in memory once read."""

    path: Location

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RolloutSet":
        path = as_location(path)
        if is_file(join(path, META)):
            found = cls(path)
            if is_file(found.table_location):
                return found
        raise LopdError(f"{path} is not a rollout set (expected {TABLE} and {META}); create one with `lopd rollout`")

    @cached_property
    def meta(self) -> dict[str, Any]:
        return read_json(join(self.path, META))

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def table_location(self) -> Location:
        """The Parquet table: `rollouts.parquet` beside `meta.json`, or on a bucket the attempt `meta.json` names."""
        return join(self.path, self.meta.get("table", TABLE))

    @cached_property
    def table(self) -> pa.Table:
        table = self.table_location
        if is_bucket(table):  # pyarrow reads the object through the fsspec filesystem, in ranges
            fs, key = filesystem(table)
            return pq.read_table(key, filesystem=fs)
        return pq.read_table(table)

    def __len__(self) -> int:
        return self.meta["num_rows"]

    @cached_property
    def prompt_ids(self) -> list[np.ndarray]:
        return _list_column(self.table, "prompt_ids", np.int64)

    @cached_property
    def response_ids(self) -> list[np.ndarray]:
        return _list_column(self.table, "response_ids", np.int64)

    @cached_property
    def behaviour_logprobs(self) -> list[np.ndarray]:
        return _list_column(self.table, "behaviour_logprobs", np.float32)

    @cached_property
    def rewards(self) -> np.ndarray:
        return self.table.column("reward").to_numpy(zero_copy_only=False).astype(np.float32)

    @cached_property
    def rubric_rewards(self) -> np.ndarray:
        """Per-row rubric reward; NaN where no judge scored the row (and for sets older than the column)."""
        if "rubric_reward" not in self.table.column_names:
            return np.full(len(self.table), np.nan, dtype=np.float32)
        return self.table.column("rubric_reward").to_numpy(zero_copy_only=False).astype(np.float32)

    @cached_property
    def step_spans(self) -> list[list[tuple[int, int]]]:
        """Per row, the [start, end) spans of model-generated response tokens ([(0, len)] for a plain rollout)."""
        lengths = [len(r) for r in self.response_ids]
        if "step_spans" not in self.table.column_names:
            return [[(0, n)] for n in lengths]
        stored = self.table.column("step_spans").to_pylist()
        return [[(int(a), int(b)) for a, b in spans] if spans is not None else [(0, n)]
                for spans, n in zip(stored, lengths)]

    def loss_mask(self, index: int) -> np.ndarray:
        """1.0 on the response tokens row `index`'s model generated, 0.0 on tool observations (float32)."""
        mask = np.zeros(len(self.response_ids[index]), dtype=np.float32)
        for start, end in self.step_spans[index]:
            mask[start:end] = 1.0
        return mask

    @cached_property
    def group_ids(self) -> np.ndarray:
        return self.table.column("group_id").to_numpy()

    def rows(self) -> list[dict[str, Any]]:
        return self.table.to_pylist()


def _list_column(table: pa.Table, name: str, dtype) -> list[np.ndarray]:
    """Split a list<...> column into per-row numpy arrays via its flat values and offsets (no Python loop per value)."""
    col = table.column(name).combine_chunks()
    values = col.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    offsets = col.offsets.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(col))]


def write_rollout_set(path: Location, records: list[dict[str, Any]], meta: dict[str, Any]) -> RolloutSet:
    """Write the set so that a reader sees all of it or nothing: staged and renamed locally, uploaded and committed
    by a create-if-absent `meta.json` on a bucket. A bucket set another writer committed first is returned as it is."""
    path = as_location(path)
    if is_file(join(path, META)):
        raise LopdError(f"{path} already holds a rollout set; remove it or choose another --out")
    records = [r if "step_spans" in r else dict(r, step_spans=[[0, len(r["response_ids"])]]) for r in records]
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    lengths = [len(r["response_ids"]) for r in records]
    meta = dict(meta, num_rows=len(records), num_response_tokens=int(sum(lengths)))
    if is_bucket(path):
        return _commit_to_bucket(path, table, meta)
    staging = path.parent / f".staging-{path.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        pq.write_table(table, staging / TABLE, compression="zstd")
        write_json_atomic(staging / META, dict(meta, created=time.time(), content_digest=file_digest(staging / TABLE)))
        if path.exists():
            path.rmdir()  # an empty directory left by the user; refuses anything else
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RolloutSet(path)


def _commit_to_bucket(path: str, table: pa.Table, meta: dict[str, Any]) -> RolloutSet:
    """Upload the table under a fresh attempt name, then create `meta.json` naming it unless a writer did first
    (that writer's set is kept and this attempt deleted)."""
    attempt = f"attempts/{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="lopd-rollouts-") as scratch:
        staged = Path(scratch) / TABLE
        pq.write_table(table, staged, compression="zstd")
        digest = file_digest(staged)
        fs, key = filesystem(join(path, attempt, TABLE))

        def upload_table() -> bytes:
            fs.put_file(str(staged), key)
            return json_bytes(dict(meta, table=f"{attempt}/{TABLE}", created=time.time(), content_digest=digest))

        location.commit_attempt(join(path, attempt), join(path, META), upload_table)
    return RolloutSet(path)
