"""What produced a model: recorded beside lopd checkpoints so later stages can check teacher consistency."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lopd.storage import read_json, write_json_atomic

LINEAGE_FILE = "lopd_lineage.json"


def read_lineage(model: str | Path) -> dict[str, Any]:
    path = Path(model) / LINEAGE_FILE
    return read_json(path) if path.is_file() else {}


def write_lineage(model_dir: str | Path, lineage: dict[str, Any]) -> None:
    write_json_atomic(Path(model_dir) / LINEAGE_FILE, lineage)
