"""Pluggable outcome verifiers and judges: `function(prompt_row: dict, response_text: str) -> float`.

A plugin is named `module:attr` (an importable module) or `path/to/file.py:attr` (a file, relative to the
current directory; no PYTHONPATH needed). `load_plugin` resolves either (verifiers, rubric judges, tool
environments); `load_verifier` and `load_judge` are its callable-returning forms.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from lopd.errors import LopdError

Verifier = Callable[[dict, str], float]
Judge = Callable[[dict, str], float]  # a rubric score in [0, 1]


def absolute_spec(spec: str | None) -> str | None:
    """`spec` with a file path made absolute (module specs unchanged), so a rollout set records a plugin that a
    later stage (a cache refresh) finds from any directory."""
    target, sep, attr = (spec or "").rpartition(":")
    if not target.endswith(".py"):
        return spec
    return f"{Path(target).expanduser().resolve()}{sep}{attr}"


def load_plugin(spec: str | None, kind: str = "verifier", example: str = "lopd.toy.words:verify",
                must_be_callable: bool = True) -> Any | None:
    """The object `module:attr` or `file.py:attr` names, or None for an empty spec; every failure is one LopdError
    line."""
    if not spec:
        return None
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise LopdError(f"{kind} {spec!r} must look like module:{'function' if must_be_callable else 'attribute'} "
                        f"or path/to/file.py:{'function' if must_be_callable else 'attribute'}, e.g. {example}")
    module = _load_file(target, kind, spec) if target.endswith(".py") else _import(target, kind, spec)
    if not hasattr(module, attr):
        raise LopdError(f"cannot load {kind} {spec!r}: {target} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if must_be_callable and not callable(obj):
        raise LopdError(f"{kind} {spec!r} is not callable")
    return obj


def _import(name: str, kind: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise LopdError(f"cannot load {kind} {spec!r}: {exc}") from None


def _load_file(target: str, kind: str, spec: str) -> ModuleType:
    """The module of a Python file, loaded once per process under a name derived from its absolute path."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise LopdError(f"cannot load {kind} {spec!r}: no file {path}; paths are relative to the current directory")
    name = f"lopd_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it, as an import would: dataclasses and pickling look it up
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_verifier(spec: str | None) -> Verifier | None:
    return load_plugin(spec, "verifier", "lopd.toy.words:verify")


def load_judge(spec: str | None) -> Judge | None:
    return load_plugin(spec, "judge", "lopd.toy.calc:judge")


def rubric_score(met: dict[str, bool], items: tuple[tuple[str, float], ...]) -> float:
    """ROPD's rubric reward (arXiv 2605.07396): sum_j w_j 1[item j met] / sum_j w_j over weighted `items`."""
    return sum(weight for name, weight in items if met[name]) / sum(weight for _, weight in items)
