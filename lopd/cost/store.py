"""Where ledger rows live: one immutable JSON object per row under `<root>/ledger/`, reached through fsspec.

Stages on many machines append rows to one storage root at once, and the root may be a bucket, where neither
SQLite nor `flock` works. An object per row needs neither: no two writers ever touch the same object, and a
reader lists the directory and aggregates. Object names are unique across machines (append time, host, pid,
random suffix) and start with the append time in nanoseconds, zero-padded, so that name order is append order
(across machines, up to their clock skew).

No reader may see half a row. On a local (or network-mounted) directory a row is written to a temporary file
beside its final name and hard-linked to it; a link never replaces an existing file, so the write is also
create-if-absent. On an object store a row is one PUT of the whole object, which is atomic; the unique name
already rules out replacing another writer's row, so no conditional PUT is asked for (S3-compatible servers
differ in whether they honour one).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from lopd.storage import root_url

DIRECTORY = "ledger"
SUFFIX = ".json"
# A finished row's name; temporary files start with "." and never match.
ROW_NAME = re.compile(r"^\d{20}-[^/]+\.json$")
_last_ns = 0


def ledger_location(root: str | os.PathLike | None) -> tuple[AbstractFileSystem, str]:
    """The filesystem of the storage root and the ledger directory's path on it."""
    fs, path = url_to_fs(root_url(root))
    return fs, f"{path.rstrip('/')}/{DIRECTORY}"


def _new_row_id() -> str:
    """`<time_ns, 20 digits>-<host>-<pid>-<8 hex>`; strictly increasing within a process even if the clock steps back."""
    global _last_ns
    _last_ns = max(time.time_ns(), _last_ns + 1)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f"{_last_ns:020d}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _link_new(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, failing if it exists: temporary file in the same directory, then a link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def put_row(root: str | os.PathLike | None, row: Mapping[str, Any]) -> str:
    """Store one row as a new object and return its id (the object's name without `.json`)."""
    fs, directory = ledger_location(root)
    row_id = _new_row_id()
    data = json.dumps(row, sort_keys=True, default=str).encode()
    if isinstance(fs, LocalFileSystem):
        _link_new(Path(directory) / f"{row_id}{SUFFIX}", data)
    else:
        fs.pipe_file(f"{directory}/{row_id}{SUFFIX}", data)
        fs.invalidate_cache(directory)  # this process's next listing must show the row
    return row_id


def get_rows(root: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Every stored row with its `id`, in append order; `[]` when there is no ledger directory (nothing is created)."""
    fs, directory = ledger_location(root)
    fs.invalidate_cache(directory)  # rows other processes wrote since this process last listed
    try:
        listed = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    names = sorted(name for name in (p.rsplit("/", 1)[-1] for p in listed) if ROW_NAME.match(name))
    if not names:
        return []
    contents = {key.rsplit("/", 1)[-1]: data for key, data in fs.cat([f"{directory}/{n}" for n in names]).items()}
    return [{**json.loads(contents[name]), "id": name.removesuffix(SUFFIX)} for name in names]
