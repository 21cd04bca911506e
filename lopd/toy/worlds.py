"""The toy worlds by name: `lopd toy prompts --world` and pipeline prompt sets `{ toy = ... }` pick one here."""
from __future__ import annotations

from types import ModuleType

from lopd.errors import LopdError
from lopd.toy import calc, words


def toy_world(name: str) -> ModuleType:
    """The module of a toy world by name ("words" or "calc"): its make_prompts, verify, judge."""
    worlds = {"words": words, "calc": calc}
    if name not in worlds:
        raise LopdError(f"unknown toy world {name!r}; choose one of: {', '.join(worlds)}")
    return worlds[name]
