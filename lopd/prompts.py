"""Reading prompt sets: one JSON object per line with a `prompt` text (and optional `id`, `answer`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lopd.errors import LopdError


def load_prompts(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict[str, Any]]:
    """Rows with normalised keys `id`, `prompt`, `answer` (plus every original field, for verifiers)."""
    path = Path(path)
    if not path.is_file():
        raise LopdError(f"prompts file {path} does not exist")
    if path.suffix not in (".jsonl", ".json"):
        raise LopdError(f"prompts file {path}: expected JSON Lines (.jsonl) with a {prompt_field!r} field per line")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise LopdError(f"prompts file {path} line {lineno} is not JSON; expected one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str):
                raise LopdError(f"prompts file {path} line {lineno} has no string field {prompt_field!r}; "
                                f"pass --prompt-field to name the field that holds the prompt")
            row = dict(obj)
            row["id"] = str(obj.get("id", f"{path.stem}-{lineno - 1}"))
            row["prompt"] = obj[prompt_field]
            row["answer"] = obj.get(answer_field)
            rows.append(row)
    if not rows:
        raise LopdError(f"prompts file {path} holds no prompts")
    return rows
