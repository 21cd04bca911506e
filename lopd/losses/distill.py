"""The three losses of the core recipe: SFT, Lightning OPD and reverse KL over the teacher's top-k."""
from __future__ import annotations

import torch

from lopd.errors import LopdError
from lopd.losses.base import (
    LossInputs,
    LossOutput,
    keep_top_fraction,
    masked_mean,
    masked_variance,
    register_loss,
    require_fields,
)
from lopd.losses import policy_gradient as pg
from lopd.losses.student import StudentRequest
from lopd.losses.topk import reverse_kl, topk_loss


@register_loss("sft", paper="supervised fine-tuning (negative log-likelihood)")
def sft(inp: LossInputs) -> LossOutput:
    """Negative log-likelihood of the cached tokens: the SFT stage on teacher-generated rollouts."""
    logp = inp.student.token_logprobs()
    loss = -masked_mean(logp, inp.mask)
    return LossOutput(loss, {"nll": loss.item()})


@register_loss(
    "lightning",
    paper="arXiv 2604.13010",
    needs=("teacher_logprobs",),
    clip=10.0,
    importance_ratio=False,
    ppo_clip=0.0,
    baseline="none",
)
def lightning(
    inp: LossInputs, clip: float, importance_ratio: bool = False, ppo_clip: float = 0.0, baseline: str = "none"
) -> LossOutput:
    """Lightning OPD: policy gradient with per-token advantage clip(log pi_T - log pi_theta, -clip, clip).

    Lightning OPD (arXiv 2604.13010) computes the teacher log-prob of each sampled token once, over
    rollouts of the SFT student, and reuses it for every step; the student log-prob is recomputed each
    step. The advantage is detached, so the gradient is sum_t A_t * grad log pi_theta(y_t).

    The paper uses w = 1 (no importance ratio to the rollout policy) and argues the fixed rollouts act
    as an implicit trust region. To test that claim the options below reintroduce the correction:
    importance_ratio multiplies each term by the detached w = pi_theta / q (loss -mean(sg(w) A log pi_theta),
    gradient w A grad log pi_theta); ppo_clip > 0 uses PPO's clipped surrogate min(w A, clip(w) A) instead
    (and implies the ratio). Both need the cached behaviour log-probs q. baseline="batch_mean" subtracts
    the masked batch-mean of the (clipped) advantage.
    """
    logp = inp.student.token_logprobs()
    advantage = pg.apply_baseline(pg.opd_advantage(inp.teacher_logprobs, logp, clip), inp.mask, baseline)
    metrics = {"advantage": masked_mean(advantage, inp.mask).item(),
               "advantage_var": masked_variance(advantage, inp.mask).item()}
    if not (importance_ratio or ppo_clip > 0):
        per_token = advantage * logp
    else:
        because = "importance_ratio or ppo_clip > 0"
        require_fields("lightning", ("behaviour_logprobs",), inp.available(), because=because)
        ratio = pg.importance_ratio(logp, inp.behaviour_logprobs)
        metrics["ratio"] = masked_mean(ratio.detach(), inp.mask).item()
        if ppo_clip > 0:
            per_token = pg.is_surrogate(ratio, advantage, ppo_clip)
        else:
            per_token = ratio.detach() * advantage * logp
    loss = -masked_mean(per_token, inp.mask)
    return LossOutput(loss, metrics)


def parse_token_ids(spec: str) -> list[int]:
    """Token ids from a comma-separated CLI string ("" = none)."""
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise LopdError(f"special_token_ids must be comma-separated integers, got {spec!r}") from None


def mask_special_tokens(tokens: torch.Tensor, mask: torch.Tensor, special_token_ids: str) -> torch.Tensor:
    """The mask with positions whose sampled token is one of `special_token_ids` set to 0."""
    ids = parse_token_ids(special_token_ids)
    if not ids:
        return mask
    special = torch.isin(tokens.long(), torch.tensor(ids, device=tokens.device))
    return mask * (~special).to(mask.dtype)


@register_loss(
    "rkl_topk",
    paper="arXiv 2603.25562",
    needs=("topk",),
    special_token_ids="",
    entropy_top_ratio=1.0,
    tail=False,
    student=lambda args: StudentRequest(entropy=args["entropy_top_ratio"] < 1.0),
)
def rkl_topk(
    inp: LossInputs, special_token_ids: str = "", entropy_top_ratio: float = 1.0, tail: bool = False
) -> LossOutput:
    """Reverse KL(student || teacher) over the teacher's cached top-k, both renormalised there.

    Revisiting OPD (arXiv 2603.25562): L_t = sum_{v in K_t} pbar_theta(v) (log pbar_theta(v) - log pbar_T(v)).
    Mode seeking: the student moves its mass onto the teacher's likely tokens on its own prefixes.

    Options from the same paper: special_token_ids drops positions whose sampled token is one of the
    listed ids (our reading of its special-token masking); entropy_top_ratio < 1 trains only on that
    fraction of the remaining tokens with the highest student entropy (full vocabulary, no grad; the paper
    uses 0.2), averaging over the kept tokens. tail=True swaps the renormalised support for full-vocabulary
    log-probs plus one tail bucket: sum_K q (log q - log p_T) + (1-Q_K) log((1-Q_K)/(1-P_K)), which stops
    the student from lowering the divergence by draining mass out of K.
    """
    mask = mask_special_tokens(inp.tokens, inp.mask, special_token_ids)
    if entropy_top_ratio < 1.0:
        mask = keep_top_fraction(inp.student.entropies(), mask, entropy_top_ratio)
    narrowed = mask if (special_token_ids or entropy_top_ratio < 1.0) else None
    return topk_loss(inp, reverse_kl, metric="rkl", tail=tail, mask=narrowed)
