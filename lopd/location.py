"""Addressing files under a storage root that may be a local directory or a bucket (issue 18).

A *location* is a `Path` when it lies on this machine (a plain path or a `file://` URL) and the URL string
(`s3://bucket/prefix/...`, `gs://...`) otherwise. Local locations stay `Path`s so that code written for a local
root keeps its exact behaviour (POSIX calls, `resolve()`, error messages); bucket locations go through fsspec.
The helpers here are the few operations the read side of score and rollout sets needs, for either kind.
"""
from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

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
    return not isinstance(where, Path)


def join(where: Location, *parts: str) -> Location:
    """`where / part / ...`; on a bucket `..` is folded lexically, as object stores have no directories to follow."""
    if isinstance(where, Path):
        return where.joinpath(*parts)
    return as_location("/".join([where, *parts]))


def resolve(where: Location) -> Location:
    """An absolute local path (symlinks followed), or the bucket URL as it is (already normalised)."""
    return where.resolve() if isinstance(where, Path) else where


def name(where: Location) -> str:
    return where.name if isinstance(where, Path) else posixpath.basename(where)


def parent(where: Location) -> Location:
    return where.parent if isinstance(where, Path) else posixpath.dirname(where)


def filesystem(where: Location) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem holding the location and the location's path on it."""
    return url_to_fs(os.fspath(where))


def is_file(where: Location) -> bool:
    if isinstance(where, Path):
        return where.is_file()
    fs, path = filesystem(where)
    return fs.isfile(path)


def is_dir(where: Location) -> bool:
    if isinstance(where, Path):
        return where.is_dir()
    fs, path = filesystem(where)
    return fs.isdir(path)


def exists(where: Location) -> bool:
    if isinstance(where, Path):
        return where.exists()
    fs, path = filesystem(where)
    return fs.exists(path)


def read_bytes(where: Location) -> bytes:
    if isinstance(where, Path):
        return where.read_bytes()
    fs, path = filesystem(where)
    return fs.cat_file(path)


def glob(where: Location, pattern: str) -> list[Location]:
    """The locations under `where` matching the relative glob `pattern`. A bucket's listing is read afresh, so that
    a command sees what other machines wrote since this process last listed it."""
    if isinstance(where, Path):
        return list(where.glob(pattern))
    fs, path = filesystem(where)
    fs.invalidate_cache(path)
    protocol = where.split("://", 1)[0]
    return [f"{protocol}://{match}" for match in fs.glob(f"{path}/{pattern}")]


def files(where: Location) -> list[tuple[str, Location, int]]:
    """Every file under the directory `where` as (relative POSIX path, location, size in bytes), in the order of
    their relative paths' parts, which is the order `sorted(Path.rglob(...))` gives; empty when there is none."""
    if isinstance(where, Path):
        found = [(p.relative_to(where).as_posix(), p, p.stat().st_size) for p in where.rglob("*") if p.is_file()]
    else:
        fs, path = filesystem(where)
        fs.invalidate_cache(path)
        listing = fs.find(path, detail=True)
        found = [(key[len(path):].lstrip("/"), join(where, key[len(path):].lstrip("/")), int(info["size"]))
                 for key, info in listing.items() if info.get("type") == "file"]
    return sorted(found, key=lambda item: item[0].split("/"))
