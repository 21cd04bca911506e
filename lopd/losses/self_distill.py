"""Self-distillation losses: the teacher is the student itself re-prompted with privileged context.

The teacher top-k cache here comes from scoring the rollouts with the initial model conditioned on a
successful sibling rollout, feedback or the reference solution (a privileged-context score set); the
maths is the top-k divergence of topk.py with a tail bucket. `srpo` routes each rollout either to GRPO
(outcome.py) or to this distillation.
"""
from __future__ import annotations

import math

import torch

from lopd.losses.base import LossInputs, LossOutput, masked_mean, register_loss
from lopd.losses.outcome import PG_DEFAULTS, clipped_surrogate, succeeded, token_advantages
from lopd.losses.policy_gradient import importance_ratio
from lopd.losses.topk import generalized_jsd, teacher_topk_logprobs, topk_support, topk_tail_entropy


def sdpo_per_token(inp: LossInputs, alpha: float, tail: bool) -> torch.Tensor:
    """SDPO's per-token divergence JSD_alpha(student, teacher) on the teacher top-k support: [B, T]."""
    student, teacher = topk_support(inp, tail=tail)
    return generalized_jsd(student, teacher, alpha)


@register_loss("sdpo", paper="arXiv 2601.20802", needs=("topk",), alpha=0.5, tail=True)
def sdpo(inp: LossInputs, alpha: float, tail: bool) -> LossOutput:
    """SDPO: top-k divergence with a tail bucket to the privileged-context self-teacher.

    SDPO (arXiv 2601.20802): the teacher is the model re-prompted with a successful sibling rollout and/or
    feedback, cached as a top-k score set (the paper uses k = 100). Per token the generalised JSD_alpha on
    the teacher top-k plus one tail bucket (full-vocabulary student log-probs, no renormalisation): alpha 0
    is the forward KL(p_T || p_theta), alpha 1 the reverse KL(p_theta || p_T), in between the JSD with
    M = alpha p_T + (1 - alpha) p_theta (GKD's conventions; the paper's experiments use alpha 0.5).
    tail=False renormalises both over K instead. Nothing here is marked UNCONFIRMED in the reference.
    """
    loss = masked_mean(sdpo_per_token(inp, alpha, tail), inp.mask)
    return LossOutput(loss, {"sdpo": loss.item()})


@register_loss(
    "srpo",
    paper="arXiv 2604.02288",
    needs=("topk", "rewards", "group_ids", "behaviour_logprobs"),
    threshold=0.5,
    alpha=0.5,
    tail=True,
    distill_coef=1.0,
    entropy_weight=False,
    **PG_DEFAULTS,
)
def srpo(inp: LossInputs, threshold: float, alpha: float, tail: bool, distill_coef: float, entropy_weight: bool,
         normalize_std: bool, clip_low: float, clip_high: float) -> LossOutput:
    """SRPO: GRPO's clipped surrogate on correct rollouts, SDPO distillation on the failed ones.

    SRPO (arXiv 2604.02288) routes each rollout by its outcome (correct: reward > threshold): a correct
    rollout gets the GRPO term -min(w A, clip(w) A) on its tokens (as `grpo`, w = pi_theta / pi_old), a
    failed one the SDPO divergence (as `sdpo`: alpha, tail) times distill_coef, since self-distillation on
    already-correct samples is ambiguous and a failed rollout is where the informed self-teacher helps. One
    token mean over the batch. The paper's entropy-aware weight, which suppresses high-entropy (unreliable)
    teacher targets, has an UNCONFIRMED formula and is off by default; entropy_weight=True multiplies the
    distillation term by 1 - clamp(H_T / log V, 0, 1), H_T the teacher entropy from its top-k plus tail.
    The token-mean combination and distill_coef are also our choice (UNCONFIRMED).
    """
    logp = inp.student.token_logprobs()
    advantage = token_advantages(inp.rewards, inp.group_ids, inp.mask, normalize_std)
    ratio = importance_ratio(logp, inp.behaviour_logprobs)
    policy_term = -clipped_surrogate(ratio, advantage, clip_low, clip_high)
    distill = sdpo_per_token(inp, alpha, tail)
    if entropy_weight:
        h_teacher = topk_tail_entropy(teacher_topk_logprobs(inp))
        distill = distill * (1.0 - (h_teacher / math.log(inp.student.vocab_size)).clamp(0.0, 1.0))
    correct = succeeded(inp, threshold).expand(inp.mask.shape)
    loss = masked_mean(torch.where(correct, policy_term, distill_coef * distill), inp.mask)
    share = masked_mean(correct.to(inp.mask.dtype), inp.mask)
    return LossOutput(loss, {
        "advantage": masked_mean(advantage, inp.mask).item(),
        "ratio": masked_mean(ratio.detach(), inp.mask).item(),
        "sdpo": masked_mean(distill.detach(), inp.mask * ~correct).item(),
        "grpo_fraction": share.item(),
    })
