"""Where lopd keeps rollouts, score sets, checkpoints and run records (see docs/cache-format.md)."""
from __future__ import annotations

import glob
import json
import os
import secrets
from pathlib import Path
from typing import Any

import click
from fsspec.core import split_protocol

from lopd import location
from lopd.errors import LopdError
from lopd.location import LOCAL_PROTOCOLS, URL, Location

ENV_ROOT = "LOPD_ROOT"
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def default_root() -> Path:
    """The storage root when no `--root` is given (`--root` always wins):

    1. `$LOPD_ROOT`, when set;
    2. `storage/` of the source checkout lopd runs from (a checkout: `pyproject.toml` beside the `lopd` package,
       as in a clone or an editable install), so the demo and the tests keep their artifacts in the repository;
    3. `$XDG_CACHE_HOME/lopd` (default `~/.cache/lopd`) for an installed package: never inside site-packages,
       and the same place whatever the current directory.
    """
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    if (PACKAGE_PARENT / "pyproject.toml").is_file():
        return PACKAGE_PARENT / "storage"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "lopd"


def root_url(root: str | os.PathLike | None) -> str:
    """The storage root for code that reaches it through fsspec: a URL given by `--root` or `$LOPD_ROOT`
    (`s3://bucket/prefix`, `gs://...`, `file://...`) as given, less a trailing slash; else the local directory
    path (not created). Read before any `Path`, which would fold the URL's `//` into one slash."""
    given = str(root) if root else os.environ.get(ENV_ROOT, "")
    if URL.match(given):
        return given.rstrip("/")
    return str(Path(given).expanduser() if given else default_root())


def local_root(root: str | os.PathLike | None) -> Path | None:
    """The root's directory on this machine (a plain path or a `file://` URL; not created), None for a bucket."""
    protocol, path = split_protocol(root_url(root))
    return Path(path) if protocol in LOCAL_PROTOCOLS else None


def root_location(root: str | os.PathLike | None) -> Location:
    """The storage root as a location (lopd.location: a `Path` on this machine, else the bucket URL), created
    nowhere: for the commands that only read and so work on a bucket root too."""
    return location.as_location(root_url(root))


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The storage root as a local directory (created), for code that reaches it with POSIX calls; a bucket root is
    refused in one line, since that code does not work on object storage yet."""
    local = local_root(root)
    if local is None:
        context = click.get_current_context(silent=True)
        who = context.command_path if context else "this lopd command"
        raise LopdError(f"{who} does not yet accept a bucket root ({root_url(root)}); use a local path "
                        "(`lopd rollout/score/train/eval/run` write to a bucket root; `lopd cost`, "
                        "`lopd report --out FILE` and `lopd cache ...` take one)")
    local.mkdir(parents=True, exist_ok=True)
    return local


def writable_root(root: str | os.PathLike | None) -> Location:
    """The storage root for code that writes through lopd.location (rollout, score, train, eval, run): a local
    directory (created, as `resolve_root` makes it) or the bucket URL, where nothing needs creating first."""
    return resolve_root(root) if local_root(root) is not None else root_location(root)


def find_artifact(directory: Location, ref: str, marker: str, noun: str) -> Location:
    """An artifact by path (a directory holding `marker`), by full id, or by unique id prefix under `directory`:
    the one resolver behind every command that takes a rollout or score set, so ids work the same everywhere.
    `directory` and the result are locations (lopd.location), so a bucket root resolves ids the same way."""
    given = location.as_location(ref)
    for exact in (given, location.join(directory, ref)):  # a full id wins even when it is also a prefix of another id
        if ref and location.is_file(location.join(exact, marker)):
            return exact
    is_id = bool(ref) and Path(ref).name == ref  # no directory part: an id or id prefix
    pattern = f"{glob.escape(ref)}*/{marker}"
    matches = sorted(location.parent(p) for p in location.glob(directory, pattern)) if is_id else []
    if len(matches) > 1:
        raise LopdError(f"{noun} id prefix {ref!r} is ambiguous under {directory}: it matches "
                        f"{', '.join(location.basename(p) for p in matches)}; give more of the id")
    if matches:
        return matches[0]
    if location.exists(given):
        raise LopdError(f"{ref} is not a {noun} (it holds no {marker}); pass a {noun} directory or id")
    raise LopdError(f"no {noun} matches {ref!r} under {directory}; pass a {noun} directory, id or unique id prefix")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write-then-rename, so readers never see a half-written file. The temporary file is created like any
    open() would (mode 0666 less the umask, typically 0644), not mkstemp's 0600, so others sharing the storage
    root can read what lopd writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json_bytes(obj))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(where: Location, obj: Any) -> None:
    """Replace a JSON record atomically on this machine (write-then-rename) or in a bucket (one PUT)."""
    where = location.as_location(where)
    if location.is_bucket(where):
        location.write_bytes(where, json_bytes(obj))
    else:
        write_json_atomic(where, obj)


def json_bytes(obj: Any) -> bytes:
    """The bytes lopd writes for a JSON record (indented, keys sorted), on a local disk or in a bucket."""
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file on this machine or in a bucket (a path, or a URL as lopd.location takes it)."""
    return json.loads(location.read_bytes(location.as_location(path)))
