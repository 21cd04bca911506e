"""Losses that route each token either to a sampled-token policy gradient or to a top-k divergence.

Both need the teacher log-prob of the sampled token (for the routing signal and the advantage) and the
teacher top-k (for the divergence branch).
"""
from __future__ import annotations

import torch

from lopd.losses.base import LossInputs, LossOutput, masked_mean, register_loss
from lopd.losses.policy_gradient import opd_advantage
from lopd.losses.topk import Divergence, forward_kl, named_divergence, topk_support


def routed_loss(
    inp: LossInputs,
    logp: torch.Tensor,
    advantage: torch.Tensor,
    use_pg: torch.Tensor,
    divergence: Divergence,
    tail: bool,
) -> LossOutput:
    """Token mean of -A_t log pi_theta(y_t) where `use_pg`, else divergence(student, teacher) on the top-k support."""
    student, teacher = topk_support(inp, tail=tail)
    per_token = torch.where(use_pg, -advantage * logp, divergence(student, teacher))
    loss = masked_mean(per_token, inp.mask)
    pg_share = masked_mean(use_pg.to(inp.mask.dtype), inp.mask)
    return LossOutput(loss, {"advantage": masked_mean(advantage, inp.mask).item(), "pg_fraction": pg_share.item()})


@register_loss(
    "tropd",
    paper="arXiv 2606.01249",
    needs=("teacher_logprobs", "topk"),
    threshold=0.1,
    clip=10.0,
    tail=False,
)
def tropd(inp: LossInputs, threshold: float, clip: float, tail: bool) -> LossOutput:
    """TrOPD: sampled-token OPD inside a teacher trust region, top-k forward KL on the outlier tokens.

    TrOPD (arXiv 2606.01249) scores each token by trust_t = min(pi_T(y_t) / pi_theta(y_t), 1). Tokens with
    trust_t >= threshold keep the sampled-token reverse-KL policy gradient (advantage
    clip(lT_t - log pi_theta, -clip, clip), detached, as in Lightning OPD); below it the student has
    put far more mass on y_t than the teacher, the one-sample estimate is unreliable, and the token is
    instead pulled toward the teacher with the forward KL over the teacher top-k (renormalised, or with
    a tail bucket when tail=True). The paper's threshold is adaptive; the fixed threshold 0.1 and the
    top-k handling are UNCONFIRMED.
    """
    logp = inp.student.token_logprobs()
    gap = inp.teacher_logprobs - logp.detach()
    trust = gap.clamp(max=0.0).exp()
    return routed_loss(inp, logp, opd_advantage(inp.teacher_logprobs, logp, clip), trust >= threshold, forward_kl, tail)


@register_loss(
    "aopd",
    paper="arXiv 2605.06387",
    needs=("teacher_logprobs", "topk"),
    negative_divergence="rkl",
    clip=0.0,
    tail=False,
)
def aopd(inp: LossInputs, negative_divergence: str, clip: float, tail: bool) -> LossOutput:
    """AOPD: policy gradient on tokens the teacher prefers (A_t > 0), top-k divergence on the others.

    AOPD (arXiv 2605.06387): A_t = D_t = lT_t - log pi_theta(y_t) (detached; clip > 0 clips it). Where
    A_t > 0 the sampled token is reinforced with -A_t log pi_theta(y_t); where A_t <= 0 pushing the
    sampled token down says nothing about where its mass should go, so the token instead minimises a
    localized divergence to the teacher over the top-k: negative_divergence = "rkl" (default) or "fkl",
    renormalised or with a tail bucket (tail=True). The paper's exact divergence is UNCONFIRMED.
    """
    divergence = named_divergence("aopd", "negative_divergence", negative_divergence)
    logp = inp.student.token_logprobs()
    advantage = opd_advantage(inp.teacher_logprobs, logp, clip)
    return routed_loss(inp, logp, advantage, advantage > 0, divergence, tail)
