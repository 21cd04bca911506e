"""Where lopd keeps rollouts, score sets, checkpoints and run records (see storage/README.md)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

ENV_ROOT = "LOPD_ROOT"
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent / "storage"


def default_root() -> Path:
    """`$LOPD_ROOT`, else `storage/` of the checkout lopd runs from, else `./storage`."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    if CHECKOUT_ROOT.is_dir():
        return CHECKOUT_ROOT
    return Path.cwd() / "storage"


def resolve_root(root: str | os.PathLike | None) -> Path:
    path = Path(root).expanduser() if root else default_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write-then-rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
