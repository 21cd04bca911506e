"""What every loss receives and returns, and the registry that names them.

Losses are pure functions of response-aligned tensors: they know nothing about models, caches or
DeepSpeed, so each can be checked against a slow reference on random tensors (tests/test_losses_*.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from lopd.errors import LopdError
from lopd.losses.student import StudentLogprobs, StudentRequest

# Which stage option produces each optional input, so a loss that lacks one can say how to get it.
FIELD_SOURCES: dict[str, str] = {
    "behaviour_logprobs": "`lopd rollout` (stored for every rollout)",
    "teacher_logprobs": "`lopd score` (stored in every score set)",
    "topk": "`lopd score --k K` with K >= 1",
    "rewards": "`lopd rollout --verifier module:function`",
    "group_ids": "`lopd rollout --n N` (N samples per prompt share a group)",
    "base_logprobs": "`lopd score --teacher BASE_MODEL` attached as the `base` score set",
    "contrast_logprobs": (
        "`lopd score --context wrong_hint` attached as the `contrast` score set (`lopd train --contrast SCORE_SET`)"
    ),
    "rubric_rewards": "`lopd rollout --judge module:function`",
}


@dataclass
class LossInputs:
    """One batch, every tensor aligned to response positions: [B, T] (or [B, T, K]).

    `student` holds the student's log-probs predicting `tokens[b, t]` and at the teacher's top-k ids
    (lopd.losses.student: gathered chunk by chunk, no [B, T, V] tensor); `mask` is 1 where the student
    generated the token (0 on padding, prompt and tool observations).
    """

    student: StudentLogprobs
    tokens: torch.Tensor
    mask: torch.Tensor
    behaviour_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None  # [B, T] log(1 - teacher top-k mass), cached by the scorer in float32
    rewards: torch.Tensor | None = None  # [B]
    group_ids: torch.Tensor | None = None  # [B]
    base_logprobs: torch.Tensor | None = None
    contrast_logprobs: torch.Tensor | None = None  # [B, T] sampled-token log-prob under the incorrect-hint context
    rubric_rewards: torch.Tensor | None = None  # [B] per-rollout rubric reward from a judge
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def available(self) -> set[str]:
        have = {f.name for f in fields(self) if f.name not in ("extras", "student") and getattr(self, f.name) is not None}
        if self.topk_ids is not None and self.topk_logprobs is not None:
            have.add("topk")
        return have | set(self.extras)


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


LossFn = Callable[..., LossOutput]


StudentPlan = Callable[[dict[str, Any]], StudentRequest]
"""What a loss reads from the student, given its resolved arguments (temperature, entropy)."""


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    paper: str
    needs: tuple[str, ...]
    defaults: dict[str, Any]
    summary: str
    student: StudentPlan = lambda args: StudentRequest()

    def student_request(self, args: dict[str, Any]) -> StudentRequest:
        """The student quantities the chunked pass must gather for this loss with these arguments."""
        return self.student(args)

    def resolve_args(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise LopdError(
                f"loss {self.name!r} has no argument {unknown[0]!r}; its arguments are "
                f"{', '.join(sorted(self.defaults)) or '(none)'}"
            )
        args = dict(self.defaults)
        for key, value in overrides.items():
            default = self.defaults[key]
            args[key] = _coerce(value, default, f"{self.name}.{key}")
        return args

    def check_inputs(self, available: set[str]) -> None:
        require_fields(self.name, self.needs, available)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Loss arguments arrive as strings from the CLI; give them the type of their default."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return type(default)(value)
    except ValueError:
        raise LopdError(f"{where} expects a {type(default).__name__}, got {value!r}") from None


def require_fields(loss: str, needs: tuple[str, ...] | list[str], available: set[str], because: str = "") -> None:
    """Raise a one-line LopdError naming the first missing input and the stage option that produces it.

    `because` names the option that made a field necessary (e.g. "ppo_clip > 0"), for losses whose
    needs depend on their hyperparameters and so can only be checked at run time.
    """
    for need in needs:
        if need not in available:
            source = FIELD_SOURCES.get(need, "a score set providing it")
            why = f" (because {because})" if because else ""
            raise LopdError(
                f"loss {loss!r} needs {need!r}{why}, which this cache lacks; produce it with {source}"
            )


REGISTRY: dict[str, LossSpec] = {}


def register_loss(name: str, *, paper: str, needs: tuple[str, ...] = (), student: StudentPlan | None = None,
                  **defaults: Any) -> Callable[[LossFn], LossFn]:
    """Register `fn(inputs: LossInputs, **hyperparameters) -> LossOutput` under `name`.

    `student` maps the resolved arguments to the StudentRequest the loss reads (a temperature other than 1,
    the student's entropy); by default the loss reads log-probs at temperature 1 only.
    """

    def wrap(fn: LossFn) -> LossFn:
        if name in REGISTRY:
            raise ValueError(f"loss {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        plan = {"student": student} if student is not None else {}
        REGISTRY[name] = LossSpec(name, fn, paper, tuple(needs), dict(defaults), summary, **plan)
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    if name not in REGISTRY:
        raise LopdError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(REGISTRY))} (see `lopd losses`)")
    return REGISTRY[name]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean over the positions the mask keeps (0 when it keeps none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_variance(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level (population) variance over the positions the mask keeps: how noisy a per-token signal is."""
    return masked_mean((values - masked_mean(values, mask)) ** 2, mask)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 log-probs lose too much, while float64 (tests) is kept as is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def keep_top_fraction(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """The mask restricted to the ceil(ratio * n) masked positions with the highest `scores`.

    Ranking is over every masked token of the batch the loss sees (a micro-batch under gradient
    accumulation), as in the high-entropy-token selections of arXiv 2603.25562 and arXiv 2604.14084.
    ratio >= 1 returns the mask unchanged.
    """
    if not 0.0 < ratio:
        raise LopdError(f"a top-token ratio must be in (0, 1], got {ratio}")
    if ratio >= 1.0:
        return mask
    n_keep = math.ceil(ratio * int((mask > 0).sum().item()))
    flat = scores.detach().masked_fill(mask <= 0, float("-inf")).flatten()
    keep = torch.zeros_like(flat, dtype=mask.dtype)
    keep[flat.topk(n_keep).indices] = 1
    return keep.view_as(mask) * mask
