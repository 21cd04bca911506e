"""Registered xOPD losses. Importing this package registers every loss module."""
from lopd.losses import distill, divergence, hybrid, outcome, policy_gradient, self_distill  # noqa: F401  (registers)
from lopd.losses.base import (
    REGISTRY,
    LossInputs,
    LossOutput,
    LossSpec,
    describe_losses,
    get_loss,
    register_loss,
)

__all__ = ["REGISTRY", "LossInputs", "LossOutput", "LossSpec", "describe_losses", "get_loss", "register_loss"]
