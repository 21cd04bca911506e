"""Registered xOPD losses. Importing this package registers every loss module."""
from typing import Any

from lopd.losses import distill, divergence, hybrid, outcome, policy_gradient, self_distill  # noqa: F401  (registers)
from lopd.losses.base import (
    REGISTRY,
    LossInputs,
    LossOutput,
    LossSpec,
    get_loss,
    register_loss,
)


def describe_losses() -> list[dict[str, Any]]:
    """One row per registered loss (name, paper, needs, defaults, summary), sorted by name, for `lopd losses`."""
    return [
        {
            "name": spec.name,
            "paper": spec.paper,
            "needs": list(spec.needs),
            "defaults": dict(spec.defaults),
            "summary": spec.summary,
        }
        for spec in sorted(REGISTRY.values(), key=lambda spec: spec.name)
    ]


__all__ = ["REGISTRY", "LossInputs", "LossOutput", "LossSpec", "describe_losses", "get_loss", "register_loss"]
