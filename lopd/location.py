"""Addressing files under a storage root that may be a local directory or a bucket (issue 18).

A *location* is a `Path` when it lies on this machine (a plain path or a `file://` URL) and the URL string
(`s3://bucket/prefix/...`, `gs://...`) otherwise. Local locations stay `Path`s so that code written for a local
root keeps its exact behaviour (POSIX calls, `resolve()`, error messages); bucket locations go through fsspec.
The helpers here are the few operations score and rollout sets need on either kind, the create-if-absent write
that commits a shard on a bucket included (lopd.cache.bucket_set). They take a location or anything `as_location`
takes (a local path as a string is a local location).
"""
from __future__ import annotations

import math
import os
import posixpath
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import split_protocol, url_to_fs

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_PROTOCOLS = (None, "file", "local")
Location = Path | str


def as_location(where: str | os.PathLike) -> Location:
    """A path or URL as a location: `Path` for this machine, a normalised URL (no `..`, no trailing slash)
    for a bucket."""
    if isinstance(where, Path):
        return where
    text = os.fspath(where)
    if not URL.match(text):
        return Path(text)
    protocol, path = split_protocol(text)
    if protocol in LOCAL_PROTOCOLS:
        return Path(path)
    return f"{protocol}://{posixpath.normpath(path).lstrip('/')}"


def is_bucket(where: Location) -> bool:
    where = as_location(where)
    return not isinstance(where, Path)


def join(where: Location, *parts: str) -> Location:
    """`where / part / ...`; on a bucket `..` is folded lexically, as object stores have no directories to follow."""
    if isinstance(where, Path):
        return where.joinpath(*parts)
    return as_location("/".join([where, *parts]))


def resolve(where: Location) -> Location:
    """An absolute local path (symlinks followed), or the bucket URL as it is (already normalised)."""
    where = as_location(where)
    return where.resolve() if isinstance(where, Path) else where


def relative(target: Location, start: Location) -> str | None:
    """`target` as a path relative to `start`, as score set manifests record their rollout set (so a root moved or
    synced elsewhere, `aws s3 sync` included, keeps its sets readable): both on this machine, or both in one
    bucket. None when no relative path leads from one to the other (a local rollout set, a bucket score set)."""
    target, start = resolve(target), resolve(start)
    if isinstance(target, Path) and isinstance(start, Path):
        return os.path.relpath(target, start)
    if isinstance(target, Path) or isinstance(start, Path):
        return None
    (target_protocol, target_path), (start_protocol, start_path) = split_protocol(target), split_protocol(start)
    if target_protocol != start_protocol or target_path.split("/")[0] != start_path.split("/")[0]:
        return None
    return posixpath.relpath(target_path, start_path)


def basename(where: Location) -> str:
    where = as_location(where)
    return where.name if isinstance(where, Path) else posixpath.basename(where)


def parent(where: Location) -> Location:
    where = as_location(where)
    return where.parent if isinstance(where, Path) else posixpath.dirname(where)


def filesystem(where: Location) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem holding the location and the location's path on it."""
    where = as_location(where)
    return url_to_fs(os.fspath(where))


def _fresh(where: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of a bucket location, with fsspec's cached listings of it, its parents and everything
    under it dropped: other machines write to the bucket, and a listing this process made earlier would hide what
    they wrote since."""
    fs, path = filesystem(where)
    for key in [k for k in fs.dircache if k.startswith(f"{path}/")]:
        fs.dircache.pop(key, None)
    fs.invalidate_cache(path)
    return fs, path


def is_file(where: Location) -> bool:
    where = as_location(where)
    if isinstance(where, Path):
        return where.is_file()
    fs, path = _fresh(where)
    return fs.isfile(path)


def is_dir(where: Location) -> bool:
    where = as_location(where)
    if isinstance(where, Path):
        return where.is_dir()
    fs, path = _fresh(where)
    return fs.isdir(path)


def exists(where: Location) -> bool:
    where = as_location(where)
    if isinstance(where, Path):
        return where.exists()
    fs, path = _fresh(where)
    return fs.exists(path)


def read_bytes(where: Location) -> bytes:
    where = as_location(where)
    if isinstance(where, Path):
        return where.read_bytes()
    fs, path = filesystem(where)
    return fs.cat_file(path)


def glob(where: Location, pattern: str) -> list[Location]:
    """The locations under `where` matching the relative glob `pattern` (a bucket's listing read afresh)."""
    where = as_location(where)
    if isinstance(where, Path):
        return list(where.glob(pattern))
    fs, path = _fresh(where)
    protocol = where.split("://", 1)[0]
    return [f"{protocol}://{match}" for match in fs.glob(f"{path}/{pattern}")]


def _listing(where: Location) -> dict[str, tuple[int, float]]:
    """Every file under the directory `where` as relative POSIX path -> (size in bytes, last-modified time in seconds
    since the epoch): one listing on a bucket, read afresh; empty when there is none."""
    where = as_location(where)
    if isinstance(where, Path):
        found = {}
        for file in where.rglob("*"):
            if file.is_file():
                stat = file.stat()
                found[file.relative_to(where).as_posix()] = (stat.st_size, stat.st_mtime)
        return found
    fs, path = _fresh(where)
    try:
        listing = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {key[len(path):].lstrip("/"): (int(info["size"]), _modified(info)) for key, info in listing.items()
            if info.get("type") == "file"}


def _modified(info: dict[str, Any]) -> float:
    """An fsspec listing entry's last-modified time in seconds since the epoch (s3fs: `LastModified`; gcsfs:
    `updated`; local: `mtime`); infinity when the store gives none, so that an object of unknown age never looks old."""
    for key in ("LastModified", "mtime", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return math.inf


def files(where: Location) -> list[tuple[str, Location, int]]:
    """Every file under the directory `where` as (relative POSIX path, location, size in bytes), in the order of
    their relative paths' parts, which is the order `sorted(Path.rglob(...))` gives; empty when there is none."""
    where = as_location(where)
    found = [(relative, join(where, relative), size) for relative, (size, _) in _listing(where).items()]
    return sorted(found, key=lambda item: item[0].split("/"))


def modified(where: Location) -> dict[str, float]:
    """Every file under the directory `where` as relative POSIX path -> last-modified time (seconds since the epoch),
    from one listing on a bucket (read afresh); what `lopd cache gc` judges a write attempt's age by."""
    return {relative: stamp for relative, (_, stamp) in _listing(where).items()}


def write_bytes(where: Location, data: bytes) -> None:
    """Replace the object (one PUT, so readers see the old bytes or the new, never a mix). Bucket locations only:
    local files keep their write-then-rename helpers (lopd.storage.write_json_atomic)."""
    where = as_location(where)
    fs, path = filesystem(where)
    fs.pipe_file(path, data)


def create(where: Location, data: bytes) -> bool:
    """Create the object only if it does not exist yet, atomically (S3's conditional PUT, `If-None-Match: *`):
    True when this call created it, False when it was already there. Of writers racing to create one object, exactly
    one gets True; this is the commit point of the bucket write protocol (lopd.cache.bucket_set)."""
    where = as_location(where)
    fs, path = filesystem(where)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def commit_attempt(attempt: Location, commit: Location, write_attempt: Callable[[], bytes]) -> bool:
    """One step of the bucket write protocol (score set shards, lopd.cache.bucket_set; rollout sets,
    lopd.rollout_set): `write_attempt()` writes under this writer's own `attempt` prefix, which nothing refers to
    yet, and returns the commit record, which is then created at `commit` only if absent. True when this writer
    committed; one that lost the race, or failed on the way, deletes its attempt."""
    try:
        won = create(commit, write_attempt())
    except BaseException:
        remove(attempt)
        raise
    if not won:
        remove(attempt)
    return won


def remove(where: Location) -> None:
    """Delete the object or everything under the prefix; nothing to delete is no error."""
    where = as_location(where)
    fs, path = filesystem(where)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
