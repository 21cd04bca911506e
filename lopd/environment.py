"""Tool environments for multi-turn rollouts: the model calls a tool mid-answer and the environment's
observation is inserted into the response.

An environment is any object with the attributes of `Environment` (`lopd rollout --tool module:attr` loads
it): `stop` lists the strings that end a tool call, `max_calls` bounds the calls per response, and
`observe(row, response_text_so_far)` returns the observation text to append after a call, or None when the
response makes no pending call (generation is finished). Observation tokens are part of the stored response
ids but not of the model's own output: the rollout set records the student-generated spans, so they are
masked out of the loss (behaviour log-prob 0.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from lopd.errors import LopdError
from lopd.verifier import load_plugin

Observe = Callable[[dict[str, Any], str], "str | None"]


@runtime_checkable
class Environment(Protocol):
    name: str
    stop: tuple[str, ...]
    max_calls: int

    def observe(self, row: dict[str, Any], response: str) -> str | None: ...


@dataclass(frozen=True)
class ToolEnvironment:
    """The plain implementation of `Environment`: a name, the call-ending strings, a call budget and a function."""

    name: str
    stop: tuple[str, ...]
    max_calls: int
    observe: Observe

    def describe(self) -> dict[str, Any]:
        return describe(self)


def describe(env: Environment) -> dict[str, Any]:
    """What of the environment enters a rollout set's identity and meta (its code is named by the spec)."""
    return {"name": str(env.name), "stop": list(env.stop), "max_calls": int(env.max_calls)}


def load_environment(spec: str | None) -> Environment | None:
    env = load_plugin(spec, "tool environment", "lopd.toy.calc:ENVIRONMENT", must_be_callable=False)
    if env is None:
        return None
    missing = [a for a in ("name", "stop", "max_calls", "observe") if not hasattr(env, a)]
    if missing or not callable(env.observe):
        raise LopdError(f"tool environment {spec!r} lacks {', '.join(missing) or 'a callable observe'}; it needs name, "
                        f"stop (strings that end a call), max_calls and observe(row, response_text) -> str | None")
    if isinstance(env.stop, str) or not env.stop:
        raise LopdError(f"tool environment {spec!r}: stop must be a non-empty list of strings, got {env.stop!r}")
    return env
