"""Deterministic crash injection for crash-safety tests: `LOPD_CRASH_AT=<point>:<n>` SIGKILLs the process
the n-th time execution reaches `point`. Unset (always, outside tests), `crash_point` is a dictionary lookup."""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(point: str) -> None:
    spec = os.environ.get("LOPD_CRASH_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
