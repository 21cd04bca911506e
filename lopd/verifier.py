"""Pluggable outcome verifiers and judges: `module:function(prompt_row: dict, response_text: str) -> float`.

`load_plugin` resolves any `module:attr` spec (verifiers, rubric judges, tool environments); `load_verifier`
and `load_judge` are its callable-returning forms.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from lopd.errors import LopdError

Verifier = Callable[[dict, str], float]
Judge = Callable[[dict, str], float]  # a rubric score in [0, 1]


def load_plugin(spec: str | None, kind: str = "verifier", example: str = "lopd.toy.words:verify",
                must_be_callable: bool = True) -> Any | None:
    """The object `module:attr` names, or None for an empty spec; every failure is one LopdError line."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise LopdError(f"{kind} {spec!r} must look like module:{'function' if must_be_callable else 'attribute'}, "
                        f"e.g. {example}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LopdError(f"cannot load {kind} {spec!r}: {exc}") from None
    if must_be_callable and not callable(obj):
        raise LopdError(f"{kind} {spec!r} is not callable")
    return obj


def load_verifier(spec: str | None) -> Verifier | None:
    return load_plugin(spec, "verifier", "lopd.toy.words:verify")


def load_judge(spec: str | None) -> Judge | None:
    return load_plugin(spec, "judge", "lopd.toy.calc:judge")


def rubric_score(met: dict[str, bool], items: tuple[tuple[str, float], ...]) -> float:
    """ROPD's rubric reward (arXiv 2605.07396): sum_j w_j 1[item j met] / sum_j w_j over weighted `items`."""
    return sum(weight for name, weight in items if met[name]) / sum(weight for _, weight in items)
