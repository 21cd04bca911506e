"""Copies on this machine of directories kept in a bucket, for the code that needs local files.

vLLM and transformers load a model from a directory and DeepSpeed saves checkpoints into one, so a pipeline whose
storage root is a bucket trains into a local mirror of its bucket prefix and publishes the trained model there, and
loads a model published in a bucket (by this machine or another) from a local copy fetched once. The mirror keeps
the bucket's key layout under `$XDG_CACHE_HOME/lopd/buckets/<protocol>/<bucket>/<key>`, so one key always maps to
one local directory. A copy is complete when its marker, `.<name>.complete` beside it, exists: a download or upload
killed half way leaves no marker and is redone.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from lopd.location import Location, as_location, filesystem, is_bucket


def mirror_path(where: Location) -> Path:
    """The directory on this machine standing for `where`: the path itself when local, else its mirror."""
    where = as_location(where)
    if not is_bucket(where):
        return where
    protocol, key = where.split("://", 1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "lopd" / "buckets" / protocol / key


def _marker(local: Path) -> Path:
    return local.parent / f".{local.name}.complete"


def _complete(local: Path) -> bool:
    """Whether `local` or a directory above it is marked as a complete copy (publishing a training run's directory
    makes a complete copy of the model inside it)."""
    return any(_marker(directory).is_file() for directory in (local, *local.parents))


def fetch(where: Location) -> Path:
    """A complete local copy of the directory `where` (itself when local): downloaded into a fresh sibling and
    renamed into place the first time, reused after. Two processes fetching at once both download; the first
    rename wins and the other copy is dropped."""
    local = mirror_path(where)
    if not is_bucket(as_location(where)) or _complete(local):
        return local
    fs, key = filesystem(where)
    staging = local.parent / f".{local.name}.download-{uuid.uuid4().hex[:8]}"
    try:
        fs.get(f"{key}/", str(staging), recursive=True)
        shutil.rmtree(local, ignore_errors=True)  # a stale or partial copy without a marker
        try:
            staging.rename(local)
        except OSError:  # another process renamed its copy in first
            if not _marker(local).is_file() and not local.is_dir():
                raise
        _marker(local).touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def writable_copy(where: Location) -> Path:
    """The local directory standing for `where`, about to be written (a training run) and then published: unmarked
    first, so that a run interrupted before its `publish` is never taken for a complete copy of the bucket's."""
    local = mirror_path(where)
    _marker(local).unlink(missing_ok=True)
    return local


def publish(local: Path, where: Location, exclude: Iterable[str] = ()) -> Location:
    """Upload the file or directory `local` to the bucket location `where` (a directory leaves out its top-level
    entries named in `exclude` and is then marked as a complete copy); a local `where` is `local` itself, so
    nothing moves. Returns `where`."""
    where = as_location(where)
    if not is_bucket(where):
        return where
    fs, key = filesystem(where)
    if local.is_file():
        fs.put_file(str(local), key)
        return where
    skipped = set(exclude)
    for file in sorted(local.rglob("*")):
        relative = file.relative_to(local)
        if file.is_file() and relative.parts[0] not in skipped:
            fs.put_file(str(file), f"{key}/{relative.as_posix()}")
    _marker(local).touch()
    return where
