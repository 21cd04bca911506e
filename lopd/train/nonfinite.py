"""The message when a training step's loss or gradient norm is NaN/inf: the step, and the likely cause.

A non-finite step is never silent: DeepSpeed (ZeRO stages 1-3, and bf16) drops an update whose gradient is
not finite, so without this check a run whose every step is NaN would finish, exit 0 and save its
unchanged starting weights (issue 15: grpo on rollouts made without --verifier).
"""
from __future__ import annotations

import torch

from lopd.train.data import Batch

FIELD_HINTS = {"rewards": "rewards are NaN for rollouts made without `lopd rollout --verifier`"}
NAN_BY_DESIGN = {"rubric_rewards"}  # NaN marks a row no judge scored


def nonfinite_message(step: int, loss: str, what: str, batch: Batch | None) -> str:
    """One line: `what` ("loss" or "gradient norm") was not finite at `step`; names the first batch field holding
    NaN/inf (the usual cause), else says the inputs were finite."""
    bad = next((name for name, value in (batch.fields.items() if batch is not None else ())
                if name not in NAN_BY_DESIGN and value.is_floating_point() and not torch.isfinite(value).all()), None)
    if bad is not None:
        cause = f"the batch's {bad!r} holds NaN/inf" + (f" ({FIELD_HINTS[bad]})" if bad in FIELD_HINTS else "")
    else:
        cause = "its inputs are finite, so the student diverged or the loss is unstable here: lower --lr or check --loss-arg"
    return f"non-finite {what} at step {step} (loss {loss!r}): {cause}; --skip-nonfinite skips such steps instead"
