"""Sampled-token OPD losses: a per-token advantage from cached log-probs times grad log pi_theta(y_t).

These need only log-probs of the sampled tokens (teacher, behaviour, base), no top-k. The shared
helpers here (advantage, baseline, importance ratio, PPO clip) are also used by `lightning` and by the
hybrid losses that fall back to a policy gradient on some tokens.
"""
from __future__ import annotations

import torch

from lopd.errors import LopdError
from lopd.losses.base import LossInputs, LossOutput, masked_mean, register_loss

BASELINES = ("none", "batch_mean")


def opd_advantage(teacher_logprobs: torch.Tensor, logp: torch.Tensor, clip: float) -> torch.Tensor:
    """The detached OPD signal D_t = log pi_T(y_t) - log pi_theta(y_t), clipped to [-clip, clip] (clip <= 0: off)."""
    advantage = teacher_logprobs - logp.detach()
    return advantage.clamp(-clip, clip) if clip > 0 else advantage


def apply_baseline(advantage: torch.Tensor, mask: torch.Tensor, baseline: str) -> torch.Tensor:
    """Subtract a variance-reducing baseline: "none", or "batch_mean" (the masked mean advantage of the batch)."""
    if baseline == "none":
        return advantage
    if baseline == "batch_mean":
        return advantage - masked_mean(advantage, mask)
    raise LopdError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")


def importance_ratio(logp: torch.Tensor, behaviour_logprobs: torch.Tensor) -> torch.Tensor:
    """w_t = pi_theta(y_t) / q(y_t) with q the policy that sampled the rollout; carries logp's gradient."""
    return torch.exp(logp - behaviour_logprobs)


def is_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, ppo_clip: float = 0.0) -> torch.Tensor:
    """Per-token off-policy surrogate to maximise: w * A, or PPO's min(w A, clip(w, 1-eps, 1+eps) A) if eps > 0.

    Its gradient is w * A * grad log pi_theta where unclipped; PPO zeroes it once the ratio has moved
    past the clip range in the direction the advantage pushes.
    """
    surrogate = ratio * advantage
    if ppo_clip <= 0:
        return surrogate
    return torch.minimum(surrogate, ratio.clamp(1.0 - ppo_clip, 1.0 + ppo_clip) * advantage)


def discounted_future_sum(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_{s >= t} gamma^(s - t) values_s along T, per sequence: [B, T] -> [B, T]. gamma = 0 is the identity.

    Discounting runs over response positions; masked positions should carry 0 so they add nothing.
    """
    if gamma == 0.0:
        return values
    out = torch.empty_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out


@register_loss(
    "opd_is",
    paper="Thinking Machines 'On-Policy Distillation' blog, tinker-cookbook (no paper); on-policy KD: arXiv 2306.13649",
    needs=("teacher_logprobs", "behaviour_logprobs"),
    coef=1.0,
    gamma=0.0,
    ppo_clip=0.0,
)
def opd_is(inp: LossInputs, coef: float, gamma: float, ppo_clip: float) -> LossOutput:
    """Vanilla OPD (tinker): importance-sampled policy gradient with A_t = -coef (log q(y_t) - log pi_T(y_t)).

    The advantage is the per-token reverse KL estimate measured on the behaviour policy q that sampled
    the rollout, so it is a constant of the cache; exp(log pi_theta - log q) corrects for the student
    having moved since. L = -mean_t exp(log pi_theta - log q) A_t (tinker's "importance_sampling" loss,
    token mean here), or the PPO-clipped surrogate when ppo_clip > 0. gamma > 0 replaces A_t by its
    discounted future sum, as tinker-cookbook's distillation recipe optionally does.
    """
    logp = inp.student.token_logprobs()
    advantage = -coef * (inp.behaviour_logprobs - inp.teacher_logprobs) * inp.mask
    advantage = discounted_future_sum(advantage, gamma)
    ratio = importance_ratio(logp, inp.behaviour_logprobs)
    loss = -masked_mean(is_surrogate(ratio, advantage, ppo_clip), inp.mask)
    return LossOutput(
        loss,
        {"advantage": masked_mean(advantage, inp.mask).item(), "ratio": masked_mean(ratio.detach(), inp.mask).item()},
    )


@register_loss(
    "exopd",
    paper="arXiv 2602.12125",
    needs=("teacher_logprobs", "behaviour_logprobs", "base_logprobs"),
    lam=1.25,
    clip=10.0,
)
def exopd(inp: LossInputs, lam: float, clip: float) -> LossOutput:
    """G-OPD / ExOPD: reward-extrapolated OPD, A_t = lam (lT_t - log pi_base) - (log pi_old - log pi_base).

    G-OPD (arXiv 2602.12125) reads OPD as RL with the implicit reward log pi_T - log pi_base and a KL
    anchor to the base model; lam > 1 extrapolates past the teacher (1.25 in the released scripts),
    lam = 1 recovers OPD with the behaviour log-prob in place of the student's. pi_old is the cached
    behaviour log-prob. L = -mean_t sg(A_t) log pi_theta(y_t).

    `clip` bounds A_t to [-clip, clip] as Lightning OPD does (arXiv 2604.13010): without it a token the
    teacher deems impossible (cached log-prob near the -1e4 floor) gives an advantage of about -1e4 and
    one step destroys the student (measured: 0% valid on the toy task). clip=0 is the paper's unclipped form.
    """
    logp = inp.student.token_logprobs()
    base = inp.base_logprobs
    advantage = (lam * (inp.teacher_logprobs - base) - (inp.behaviour_logprobs - base)).detach()
    if clip > 0:
        advantage = advantage.clamp(-clip, clip)
    loss = -masked_mean(advantage * logp, inp.mask)
    return LossOutput(loss, {"advantage": masked_mean(advantage, inp.mask).item()})
