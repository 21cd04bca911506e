"""Per-token divergences to a teacher known through its cached top-k (support and maths in topk.py).

Each loss is a token mean, over the response mask, of a divergence between the student and the teacher
on the top-k support: renormalised over K unless the loss says tail bucket.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from lopd.errors import LopdError
from lopd.losses.base import LossInputs, LossOutput, masked_mean, register_loss
from lopd.losses.distill import rkl_topk
from lopd.losses.student import StudentRequest
from lopd.losses.topk import (
    forward_kl,
    generalized_jsd,
    generalized_jsd_terms,
    kl,
    mixture,
    reverse_kl,
    teacher_topk_logprobs,
    topk_loss,
    topk_support,
    topk_tail_entropy,
)


@register_loss("gkd", paper="arXiv 2306.13649", needs=("topk",), beta=0.5, temperature=1.0,
               student=lambda args: StudentRequest(temperature=args["temperature"]))
def gkd(inp: LossInputs, beta: float, temperature: float) -> LossOutput:
    """GKD: generalised JSD_beta between teacher and student over the teacher top-k, renormalised.

    GKD (arXiv 2306.13649) with TRL's conventions: M = beta p_T + (1-beta) p_theta, beta = 0 is the
    forward KL(p_T || p_theta) and beta = 1 the reverse KL(p_theta || p_T). The temperature divides the
    student logits and, on the renormalised support, the teacher log-probs too (as TRL divides both
    logits), so the two are compared at the same temperature.
    """
    return topk_loss(inp, partial(generalized_jsd, beta=beta), metric="jsd", temperature=temperature)


@register_loss("fkl_topk", paper="arXiv 2306.13649", needs=("topk",))
def fkl_topk(inp: LossInputs) -> LossOutput:
    """Forward KL(teacher || student) over the teacher's top-k, both renormalised there.

    Classic (mass-covering) distillation restricted to the cached support; the beta = 0 end of GKD
    (arXiv 2306.13649).
    """
    return topk_loss(inp, forward_kl, metric="fkl")


@register_loss("fkl_topk_tail", paper="arXiv 2306.13649", needs=("topk",))
def fkl_topk_tail(inp: LossInputs) -> LossOutput:
    """Forward KL(teacher || student) over the teacher's top-k plus one tail bucket, no renormalisation.

    sum_{v in K} p_T(v) [log p_T(v) - log p_theta(v)] + (1-P_K) log((1-P_K)/(1-Q_K)) with full-vocabulary
    student probabilities (eps 1e-6 on the tails): the exact KL of the coarse-grained pair, a lower bound
    on the full forward KL (GKD, arXiv 2306.13649, beta = 0), which also penalises student mass outside K.
    """
    return topk_loss(inp, forward_kl, metric="fkl", tail=True)


def skew(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(p || alpha p + (1 - alpha) q): DistiLLM's skewed KL, bounded by log(1/alpha) and smooth in q."""
    return kl(p, mixture(p, q, alpha))


@register_loss("skew_kl", paper="arXiv 2402.03898", needs=("topk",), alpha=0.1)
def skew_kl(inp: LossInputs, alpha: float) -> LossOutput:
    """DistiLLM skew forward KL: KL(p_T || alpha p_T + (1-alpha) p_theta) over the teacher top-k, renormalised.

    DistiLLM (arXiv 2402.03898) mixes a little of the teacher into the student side so the gradient
    stays bounded where the student puts almost no mass. Here with the teacher entropy term kept, so the
    loss is a true divergence (0 at equality); DistiLLM's cross-entropy form differs by a constant.
    """
    return topk_loss(inp, lambda student, teacher: skew(teacher, student, alpha), metric="skew_kl")


@register_loss("skew_rkl", paper="arXiv 2402.03898", needs=("topk",), alpha=0.1)
def skew_rkl(inp: LossInputs, alpha: float) -> LossOutput:
    """DistiLLM skew reverse KL: KL(p_theta || alpha p_theta + (1-alpha) p_T) over the teacher top-k, renormalised.

    DistiLLM (arXiv 2402.03898): the mode-seeking direction with the student mixed into the target, which
    keeps the loss finite where the teacher puts almost no mass on the student's choices.
    """
    return topk_loss(inp, lambda student, teacher: skew(student, teacher, alpha), metric="skew_rkl")


@register_loss("entropy_aware", paper="arXiv 2603.07079", needs=("topk",), h_max=0.0, tail=False)
def entropy_aware(inp: LossInputs, h_max: float, tail: bool) -> LossOutput:
    """EOPD: reverse KL everywhere plus forward KL weighted by the teacher's normalised entropy.

    Entropy-Aware OPD (arXiv 2603.07079): where the teacher is uncertain, mode seeking alone collapses
    the student onto one of several good continuations, so a mass-covering term is added there. Per
    token: KL(p_theta||p_T) + w_t KL(p_T||p_theta) with w_t = clamp(H_T / H_max, 0, 1) (the weight of an
    unofficial implementation; the paper's exact schedule is UNCONFIRMED). H_T is estimated from the
    cached top-k plus the missing mass as one bucket; h_max <= 0 means log(V). Both KLs are on the
    renormalised top-k support, or with the tail bucket when tail=True.
    """
    h_max = h_max if h_max > 0 else math.log(inp.student.vocab_size)
    weight = (topk_tail_entropy(teacher_topk_logprobs(inp)) / h_max).clamp(0.0, 1.0)
    student, teacher = topk_support(inp, tail=tail)
    per_token = reverse_kl(student, teacher) + weight * forward_kl(student, teacher)
    loss = masked_mean(per_token, inp.mask)
    return LossOutput(loss, {"eopd": loss.item(), "fkl_weight": masked_mean(weight, inp.mask).item()})


@register_loss("tip", paper="arXiv 2604.14084", needs=("topk",), ratio=0.5,
               student=lambda args: StudentRequest(entropy=True))
def tip(inp: LossInputs, ratio: float) -> LossOutput:
    """TIP: reverse KL over the teacher top-k, trained only on the `ratio` highest student-entropy tokens.

    TIP (arXiv 2604.14084) reports that the top 50% of tokens by student entropy carry the distillation
    signal, with equal quality and up to 47% less peak memory. This is rkl_topk (renormalised top-k)
    with entropy_top_ratio = ratio; the paper's variant that also adds low-entropy high-divergence tokens
    is not implemented.
    """
    return rkl_topk(inp, entropy_top_ratio=ratio)


@register_loss("opsd", paper="arXiv 2601.18734", needs=("topk",), beta=0.0, tau=0.05, clip="token")
def opsd(inp: LossInputs, beta: float, tau: float, clip: str) -> LossOutput:
    """OPSD: per-token JSD_beta over the teacher top-k (renormalised), clipped pointwise at tau.

    On-Policy Self-Distillation (arXiv 2601.18734) uses the model conditioned on the reference solution as
    its own teacher. Per token D_t = JSD_beta (beta = 0: forward KL, the later scripts' setting; GKD's
    conventions for the ends), then D_t <- min(D_t, tau) with tau = 0.05: a token whose divergence
    exceeds tau contributes the constant tau and therefore zero gradient, so a few tokens on which the
    privileged teacher disagrees wildly cannot dominate the update. tau <= 0 turns the clip off.

    clip = "token" (default) is that formula, as the paper writes it. clip = "element" is what OPSD's released
    code does: it clamps each support element's JSD term at tau before summing, so a token keeps the gradient
    of its unclipped elements (at tau = 0.05 per-token clipping zeroes the gradient of most tokens of a
    strongly disagreeing teacher, element clipping of none). The default follows the paper's equation; choose
    "element" to reproduce the released training runs.
    """
    clipped, over = opsd_per_token(inp, beta, tau, clip)
    loss = masked_mean(clipped, inp.mask)
    return LossOutput(loss, {"opsd": loss.item(), "clipped": masked_mean(over, inp.mask).item()})


OPSD_CLIPS = ("token", "element")


def opsd_per_token(inp: LossInputs, beta: float, tau: float, clip: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """OPSD's per-token term on the renormalised teacher top-k, clipped at tau, and how much the clip bit.

    clip "token": min(JSD_beta, tau), the indicator of a clipped token; "element": sum_v min(term_v, tau) over
    the JSD's support elements, the fraction of a token's elements clipped. Returns (divergence [B, T], clipped
    [B, T] without grad, in the mask's dtype); tau <= 0: no clip. Shared by `opsd` and by losses that add the
    OPSD term to another objective (`sdar`).
    """
    if clip not in OPSD_CLIPS:
        raise LopdError(f"opsd clip must be one of {', '.join(OPSD_CLIPS)}, got {clip!r}")
    student, teacher = topk_support(inp)
    if clip == "element":
        terms = generalized_jsd_terms(student, teacher, beta)
        if tau <= 0:
            return terms.sum(-1), torch.zeros_like(inp.mask)
        return terms.clamp(max=tau).sum(-1), (terms.detach() > tau).to(inp.mask.dtype).mean(-1)
    divergence = generalized_jsd(student, teacher, beta)
    if tau <= 0:
        return divergence, torch.zeros_like(inp.mask)
    return divergence.clamp(max=tau), (divergence.detach() > tau).to(inp.mask.dtype)
