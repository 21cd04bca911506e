"""Divergences between the student and a teacher known only through its cached top-k log-probs.

A teacher top-k cache (`lopd score --k K`) fixes, at every position, K token ids and their teacher
log-probs. Two truncations turn that into a pair of proper distributions on a common support
(reference section 3):

- renormalised: both student and teacher renormalised over the K ids (support size K);
- tail bucket: full-vocabulary student log-probs at the K ids plus one bucket holding the remaining
  mass, 1 - P_K for the teacher and 1 - Q_K for the student (support size K + 1). KL on this
  coarse-grained pair is exact for the pair and a lower bound on the full-vocabulary KL.

Every divergence below takes two log-prob tensors on such a support ([B, T, S]) and returns [B, T], so
each loss is "build the support, pick a divergence, average over the mask".
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lopd.errors import LopdError
from lopd.losses.base import LossInputs, LossOutput, masked_mean, upcast

TAIL_EPS = 1e-6
"""Floor on a tail mass before its log: a teacher top-k that covers (numerically) all the mass has tail 0."""

LOGPROB_FLOOR = -1e4
"""Floor on cached teacher log-probs, so a -inf entry (padding, masked vocab) gives 0 * finite, not NaN."""

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def teacher_topk_logprobs(inp: LossInputs) -> torch.Tensor:
    """The cached teacher top-k log-probs, at least float32 and floored at LOGPROB_FLOOR: [B, T, K]."""
    return upcast(inp.topk_logprobs).clamp_min(LOGPROB_FLOOR)


def renormalise(logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs renormalised over the last dim (the top-k support)."""
    return logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)


def tail_logmass(logprobs: torch.Tensor) -> torch.Tensor:
    """log(max(1 - sum_k p_k, TAIL_EPS)) of the mass outside the support: [..., K] -> [..., 1]."""
    mass = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    return (-torch.expm1(mass)).clamp_min(TAIL_EPS).log()


def with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """Append the tail bucket to full-vocabulary log-probs gathered at the top-k ids: [..., K] -> [..., K+1]."""
    return torch.cat([logprobs, tail_logmass(logprobs)], dim=-1)


def teacher_tail(inp: LossInputs, teacher: torch.Tensor) -> torch.Tensor:
    """The teacher's log tail mass [B, T, 1]: the scorer's cached value when the batch has it, else rebuilt from the
    top-k. The scorer computes it from the engine's float32 log-probs before they are stored as float16; rebuilt
    from float16 top-k log-probs, 1 - sum p_k of a peaked teacher loses most of its digits (up to ~40% relative
    error on tails near 1e-3)."""
    if inp.tail_logprob is None:
        return tail_logmass(teacher)
    return upcast(inp.tail_logprob).unsqueeze(-1).clamp_min(math.log(TAIL_EPS))


def topk_support(inp: LossInputs, tail: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the common support built from the teacher's top-k.

    tail=False: both renormalised over K ([B, T, K]). tail=True: full-vocabulary log-probs at K plus
    one tail bucket each ([B, T, K+1]). `temperature` divides the student logits; on the renormalised
    support it also divides the teacher log-probs, which equals softmax(teacher_logits / T) restricted
    to K (the cached log-probs differ from the logits by a per-position constant), as TRL's GKD does.
    With a tail bucket the teacher's mass outside K is unknown at another temperature, so only T = 1.
    """
    if tail and temperature != 1.0:
        raise LopdError("a temperature other than 1 needs the renormalised top-k support, not the tail bucket")
    student = inp.student.topk_logprobs(temperature)
    teacher = teacher_topk_logprobs(inp)
    if tail:
        return with_tail(student), torch.cat([teacher, teacher_tail(inp, teacher)], dim=-1)
    return renormalise(student), renormalise(teacher / temperature)


def teacher_kl(inp: LossInputs) -> torch.Tensor:
    """Token-mean KL(student || teacher) on the tail-bucket support, without grad: a training metric.

    The K + 1 bucket pair coarse-grains the full vocabulary, so this is a lower bound on the full-vocabulary
    reverse KL that any top-k cache (even K = 1) can report, whatever loss is being trained.
    """
    with torch.no_grad():
        return masked_mean(reverse_kl(*topk_support(inp, tail=True)), inp.mask)


def topk_tail_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of a top-k distribution whose missing mass is treated as one bucket: [B, T, K] -> [B, T].

    A coarse-grained (lower-bound) estimate of the full entropy; used for the teacher in EOPD
    (arXiv 2603.07079), whose cache holds only the top-k.
    """
    probs = logprobs.exp()
    tail = (1.0 - probs.sum(-1)).clamp_min(0.0)
    return -((probs * logprobs).sum(-1) + torch.special.xlogy(tail, tail))


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) for log-prob tensors on one support."""
    return kl_terms(p, q).sum(-1)


def kl_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The terms p(v) (log p(v) - log q(v)) of KL(p || q), one per support element."""
    return p.exp() * (p - q)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher): mode seeking, the on-policy distillation direction."""
    return kl(student, teacher)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student): mass covering, the classic distillation direction."""
    return kl(teacher, student)


def mixture(p: torch.Tensor, q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * e^p + (1 - weight) * e^q), the log of a two-component mixture."""
    if weight >= 1.0:
        return p
    if weight <= 0.0:
        return q
    return torch.logsumexp(torch.stack([p + math.log(weight), q + math.log1p(-weight)]), dim=0)


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_theta || M), M = beta p_T + (1 - beta) p_theta.

    GKD (arXiv 2306.13649) as TRL's generalized_jsd_loss computes it: beta = 0 is special-cased to the
    forward KL(p_T || p_theta) and beta = 1 to the reverse KL(p_theta || p_T) (the literal formula
    would be identically 0 at both ends).
    """
    return generalized_jsd_terms(student, teacher, beta).sum(-1)


def generalized_jsd_terms(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-support-element terms of JSD_beta ([B, T, S]; their sum over S is `generalized_jsd`)."""
    if not 0.0 <= beta <= 1.0:
        raise LopdError(f"the JSD beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_terms(teacher, student)
    if beta == 1.0:
        return kl_terms(student, teacher)
    mix = mixture(teacher, student, beta)
    return beta * kl_terms(teacher, mix) + (1.0 - beta) * kl_terms(student, mix)


DIVERGENCES: dict[str, Divergence] = {"rkl": reverse_kl, "fkl": forward_kl}


def named_divergence(loss: str, knob: str, name: str) -> Divergence:
    """The divergence a string knob names, or a LopdError listing the choices."""
    if name not in DIVERGENCES:
        raise LopdError(f"{loss}.{knob} must be one of {', '.join(sorted(DIVERGENCES))}, got {name!r}")
    return DIVERGENCES[name]


def topk_loss(
    inp: LossInputs,
    divergence: Divergence,
    *,
    metric: str,
    tail: bool = False,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> LossOutput:
    """Token mean of divergence(student, teacher) on the top-k support over `mask` (default inp.mask).

    The metrics report the loss under `metric` and, when `mask` narrows inp.mask, the fraction of
    masked tokens kept.
    """
    student, teacher = topk_support(inp, tail=tail, temperature=temperature)
    keep = inp.mask if mask is None else mask
    loss = masked_mean(divergence(student, teacher), keep)
    metrics = {metric: loss.item()}
    if mask is not None:
        metrics["kept"] = (keep.sum() / inp.mask.sum().clamp_min(1.0)).item()
    return LossOutput(loss, metrics)
