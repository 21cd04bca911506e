"""Pluggable outcome verifiers: `module:function(prompt_row: dict, response_text: str) -> float`."""
from __future__ import annotations

import importlib
from typing import Callable

from lopd.errors import LopdError

Verifier = Callable[[dict, str], float]


def load_verifier(spec: str | None) -> Verifier | None:
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise LopdError(f"verifier {spec!r} must look like module:function, e.g. lopd.toy.words:verify")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LopdError(f"cannot load verifier {spec!r}: {exc}") from None
    if not callable(fn):
        raise LopdError(f"verifier {spec!r} is not callable")
    return fn
