"""What every toy world's prompt splits are made of, and how they are written for `lopd rollout --prompts`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    answer: str  # one reference answer: a valid completion (words) or the expression's value (calc)


def write_prompts_jsonl(prompts: list[Prompt], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n")
    return path
