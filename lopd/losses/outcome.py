"""Outcome-side building blocks shared by the outcome-aware losses and the alignment diagnostic.

GRPO's group-normalised sequence advantage (arXiv 2402.03300) and the step structure of agent
trajectories (maximal runs of student-generated tokens; tool observations, masked out, separate steps,
as SOD defines them: arXiv 2605.07725). Both are derived from what every batch already carries
(rewards, group ids, the loss mask), so no extra cache field is needed for them.

Below the helpers, the losses built on them: GRPO itself and the outcome-aware OPD variants that add a
teacher signal to (or reweight) the GRPO advantage: `grpo`, `ropd`, `sod`, `uni_opd`, `rlsd`, `rlrt`,
`rlcsd`, `sdar` (reference section 4). All policy-gradient ones use the PPO-clipped surrogate against the
cached behaviour log-probs (pi_old) with the asymmetric clip range [1 - clip_low, 1 + clip_high].
"""
from __future__ import annotations

import torch

from lopd.errors import LopdError
from lopd.losses.base import FIELD_SOURCES, LossInputs, LossOutput, masked_mean, register_loss
from lopd.losses.divergence import opsd_per_token
from lopd.losses.policy_gradient import importance_ratio, is_surrogate, opd_advantage


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each rollout's group as 0..G-1 (in sorted group-id order) and G: [B] -> ([B] int64, int)."""
    unique, group = torch.unique(group_ids, return_inverse=True)
    return group, unique.numel()


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """A_GRPO per sequence: (r - mean of its group) / (std of its group + eps), or unscaled if not normalize_std.

    Groups are the rollouts of one prompt (`lopd rollout --n N`) in the batch (the trainer batches whole groups
    for losses that need group ids: lopd.train.sampling); the std is the population std (GRPO's reference
    code), so a group whose rewards are all equal gets advantage 0.
    rewards, group_ids: [B] -> [B].
    """
    rewards = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    group, n_groups = group_index(group_ids)
    count = rewards.new_zeros(n_groups).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, group, rewards) / count
    centred = rewards - mean[group]
    if not normalize_std:
        return centred
    var = torch.zeros_like(count).index_add_(0, group, centred**2) / count
    return centred / (var.sqrt()[group] + eps)


def step_index(mask: torch.Tensor) -> torch.Tensor:
    """Step number of every response position: steps are maximal runs of mask > 0 along T, numbered 0, 1, ...
    per sequence; -1 where the mask is 0 (tool observations, padding). [B, T] -> [B, T] int64.
    """
    on = mask > 0
    starts = on & ~torch.cat([torch.zeros_like(on[:, :1]), on[:, :-1]], dim=1)
    index = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(on, index, torch.full_like(index, -1))


# ------------------------------------------------------------------------------------------- shared maths

CLIP_LOW, CLIP_HIGH = 0.2, 0.28
"""PPO clip range [1 - 0.2, 1 + 0.28] (DAPO's clip-higher), the default of every loss in this module."""

PG_DEFAULTS = {"normalize_std": True, "clip_low": CLIP_LOW, "clip_high": CLIP_HIGH}
"""Knobs of the GRPO part shared by every policy-gradient loss here."""


def token_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor,
                     normalize_std: bool) -> torch.Tensor:
    """A_GRPO of each sequence broadcast to every response position: [B] -> [B, T]."""
    return group_advantages(rewards, group_ids, normalize_std)[:, None].expand(mask.shape)


def clipped_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """PPO's surrogate min(w A, clip(w, 1 - clip_low, 1 + clip_high) A) with an asymmetric range.

    Where A >= 0 only the upper bound can bind and where A < 0 only the lower one, so this is
    `is_surrogate` with the bound that binds on each token. A bound <= 0 turns that side's clip off.
    """
    upper = is_surrogate(ratio, advantage, clip_high)
    lower = is_surrogate(ratio, advantage, clip_low)
    return torch.where(advantage >= 0, upper, lower)


def ppo_loss(inp: LossInputs, logp: torch.Tensor, advantage: torch.Tensor, clip_low: float, clip_high: float,
             **metrics: float) -> LossOutput:
    """-token-mean of the clipped surrogate of pi_theta / pi_old (cached behaviour log-probs) times sg(A).

    The metrics report the mean advantage and ratio over the mask, plus any given.
    """
    advantage = advantage.detach()
    ratio = importance_ratio(logp, inp.behaviour_logprobs)
    loss = -masked_mean(clipped_surrogate(ratio, advantage, clip_low, clip_high), inp.mask)
    return LossOutput(loss, {
        "advantage": masked_mean(advantage, inp.mask).item(),
        "ratio": masked_mean(ratio.detach(), inp.mask).item(),
        **metrics,
    })


def grpo_loss(inp: LossInputs, rewards: torch.Tensor, normalize_std: bool, clip_low: float,
              clip_high: float) -> LossOutput:
    """The GRPO loss of `grpo` with the given per-rollout rewards (outcome or rubric)."""
    logp = inp.student.token_logprobs()
    advantage = token_advantages(rewards, inp.group_ids, inp.mask, normalize_std)
    return ppo_loss(inp, logp, advantage, clip_low, clip_high)


def succeeded(inp: LossInputs, threshold: float) -> torch.Tensor:
    """[B, 1] bool: the rollout's reward exceeds `threshold` (a correct / successful rollout)."""
    return (inp.rewards > threshold)[:, None]


# ------------------------------------------------------------------------------------------------ losses


@register_loss("grpo", paper="arXiv 2402.03300", needs=("rewards", "group_ids", "behaviour_logprobs"), **PG_DEFAULTS)
def grpo(inp: LossInputs, normalize_std: bool, clip_low: float, clip_high: float) -> LossOutput:
    """GRPO: outcome-only baseline, the group-normalised sequence advantage on every token, PPO-clipped.

    GRPO (arXiv 2402.03300): A_t = A_GRPO = (r - mean of the group) / (std of the group + eps) on every
    masked token of the rollout (normalize_std=False: Dr. GRPO's unscaled r - mean); L = -token-mean of
    min(w A, clip(w) A) with w = pi_theta / pi_old (cached behaviour log-probs). No KL term. The clip
    range [1 - clip_low, 1 + clip_high] = [0.8, 1.28] is DAPO's clip-higher, not the paper's symmetric
    0.2 (clip_high=0.2 restores it); the token mean over the batch (not per-sequence means) is DAPO's
    too. Nothing here is UNCONFIRMED. A group whose rewards are all equal contributes no gradient.
    """
    return grpo_loss(inp, inp.rewards, normalize_std, clip_low, clip_high)


@register_loss("ropd", paper="arXiv 2605.07396", needs=("rubric_rewards", "group_ids", "behaviour_logprobs"),
               **PG_DEFAULTS)
def ropd(inp: LossInputs, normalize_std: bool, clip_low: float, clip_high: float) -> LossOutput:
    """ROPD: GRPO with the judge's per-rollout rubric reward in place of the verifier's outcome reward.

    ROPD (arXiv 2605.07396) scores each rollout with a rubric judge (`lopd rollout --judge`) and uses that
    reward in the GRPO advantage; the loss is otherwise `grpo` (same knobs). How the paper aggregates rubric
    items into one reward is up to the judge; the GRPO form and clip range used here are UNCONFIRMED for
    this paper (clip_low / clip_high / normalize_std change them). A rollout without a rubric score (NaN,
    as batches carry it) stops the loss with an error rather than turning its group's advantages into NaN.
    """
    if torch.isnan(inp.rubric_rewards).any():
        raise LopdError(f"loss 'ropd' needs a rubric reward for every rollout; score them all with "
                        f"{FIELD_SOURCES['rubric_rewards']}")
    return grpo_loss(inp, inp.rubric_rewards, normalize_std, clip_low, clip_high)


@register_loss(
    "sod",
    paper="arXiv 2605.07725",
    needs=("teacher_logprobs", "rewards", "group_ids", "behaviour_logprobs"),
    eps=1e-6,
    delta=0.2,
    c=1.0,
    **PG_DEFAULTS,
)
def sod(inp: LossInputs, eps: float, delta: float, c: float, normalize_std: bool, clip_low: float,
        clip_high: float) -> LossOutput:
    """SOD: GRPO advantage plus a step-weighted teacher signal, for tool-use trajectories.

    SOD (arXiv 2605.07725): steps are maximal runs of student tokens (tool observations, masked out,
    separate them; `step_index`). Per step k, d_k = mean over its tokens of |log pi_old(y_t) - lT_t|;
    w_k = min((d_1 + eps) / (d_k + eps), 1 + delta), so steps that drift further from the teacher than the
    first one are down-weighted and none is up-weighted past 1 + delta. A_t = A_GRPO + c w_k(t)
    (lT_t - log pi_old(y_t)), PPO-clipped surrogate against pi_old. delta = 0.2 is the paper's value (its
    released config uses 0.5: set delta). Nothing here is marked UNCONFIRMED in the reference.
    """
    on = inp.mask > 0
    steps = step_index(inp.mask)
    index = steps.clamp_min(0)
    signal = inp.teacher_logprobs - inp.behaviour_logprobs
    gap = torch.where(on, signal.abs(), torch.zeros_like(signal))
    sums = torch.zeros_like(gap).scatter_add_(1, index, gap)
    counts = torch.zeros_like(gap).scatter_add_(1, index, on.to(gap.dtype))
    drift = sums / counts.clamp_min(1.0)  # [B, T]: d_k of step k in column k
    step_weight = ((drift[:, :1] + eps) / (drift + eps)).clamp(max=1.0 + delta)
    weight = step_weight.gather(1, index)
    logp = inp.student.token_logprobs()
    advantage = token_advantages(inp.rewards, inp.group_ids, inp.mask, normalize_std) + c * weight * signal
    return ppo_loss(
        inp, logp, advantage, clip_low, clip_high,
        steps=(steps.max(dim=1).values + 1).to(gap.dtype).mean().item(),
        step_weight=masked_mean(weight, inp.mask).item(),
    )


UNI_OPD_DIRECTIONS = ("both", "correct_up", "incorrect_down")
UNI_OPD_MODES = ("mean", "minmax")


@register_loss(
    "uni_opd",
    paper="arXiv 2605.03677",
    needs=("teacher_logprobs", "rewards", "group_ids"),
    clip=10.0,
    threshold=0.5,
    delta=0.4,
    direction="both",
    mode="mean",
)
def uni_opd(inp: LossInputs, clip: float, threshold: float, delta: float, direction: str, mode: str) -> LossOutput:
    """Uni-OPD: OPD advantage clip(D_t, +-clip), shifted per group so correct rollouts outrank incorrect ones.

    Uni-OPD (arXiv 2605.03677): A_t = clip(lT_t - log pi_theta(y_t), -10, 10), detached. Per group, with a
    rollout correct when its reward > threshold: mu_c and mu_w summarise the token advantages of the correct
    and the incorrect rollouts; if mu_c - mu_w < delta, s = mu_w - mu_c + delta is added as +s/2 to every
    token of the correct rollouts and -s/2 to the incorrect ones (direction "both"; "correct_up" adds +s to
    the correct only, "incorrect_down" -s to the incorrect only), so the OPD signal cannot rank a wrong
    rollout above a right one. Groups without both kinds are left alone. L = -mean_t sg(A_t) log pi_theta.

    UNCONFIRMED (reference gives only the names): each rollout is first summarised by its mean token
    advantage; mode "mean" averages those over the correct / incorrect rollouts, mode "minmax" takes the
    worst correct (min) and the best incorrect (max) rollout, so every pair ends at least delta apart.
    """
    if direction not in UNI_OPD_DIRECTIONS:
        raise LopdError(f"uni_opd.direction must be one of {', '.join(UNI_OPD_DIRECTIONS)}, got {direction!r}")
    if mode not in UNI_OPD_MODES:
        raise LopdError(f"uni_opd.mode must be one of {', '.join(UNI_OPD_MODES)}, got {mode!r}")
    logp = inp.student.token_logprobs()
    advantage = opd_advantage(inp.teacher_logprobs, logp, clip)
    count = inp.mask.sum(1)
    per_rollout = (advantage * inp.mask).sum(1) / count.clamp_min(1.0)
    correct = succeeded(inp, threshold)[:, 0]
    group, n_groups = group_index(inp.group_ids)
    summary, n_kind = {}, {}
    for kind, members in (("c", correct & (count > 0)), ("w", ~correct & (count > 0))):
        n_kind[kind] = per_rollout.new_zeros(n_groups).index_add_(0, group, members.to(per_rollout.dtype))
        if mode == "mean":
            total = per_rollout.new_zeros(n_groups).index_add_(0, group, torch.where(members, per_rollout, 0.0))
            summary[kind] = total / n_kind[kind].clamp_min(1.0)
        else:
            fill, reduce = (float("inf"), "amin") if kind == "c" else (float("-inf"), "amax")
            summary[kind] = per_rollout.new_full((n_groups,), fill).scatter_reduce_(
                0, group, torch.where(members, per_rollout, fill), reduce
            )
    mixed = (n_kind["c"] > 0) & (n_kind["w"] > 0)
    margin = torch.where(mixed, summary["c"] - summary["w"], torch.full_like(summary["c"], delta))
    shift = (delta - margin).clamp_min(0.0)[group]  # s per rollout, 0 where its group needs none
    up = {"both": 0.5, "correct_up": 1.0, "incorrect_down": 0.0}[direction]
    down = {"both": 0.5, "correct_up": 0.0, "incorrect_down": 1.0}[direction]
    bump = torch.where(correct, up * shift, -down * shift)
    advantage = advantage + bump[:, None]
    loss = -masked_mean(advantage * logp, inp.mask)
    return LossOutput(loss, {
        "advantage": masked_mean(advantage, inp.mask).item(),
        "shifted_groups": ((delta - margin) > 0).to(per_rollout.dtype).mean().item(),
    })


def privileged_weight(delta: torch.Tensor, sign: torch.Tensor, lam: float, eps_w: float) -> torch.Tensor:
    """RLSD's advantage multiplier (1 - lam) + lam clip(exp(sign Delta_t), 1 - eps_w, 1 + eps_w)."""
    return (1.0 - lam) + lam * torch.exp(sign * delta).clamp(1.0 - eps_w, 1.0 + eps_w)


@register_loss(
    "rlsd",
    paper="arXiv 2604.03128",
    needs=("teacher_logprobs", "rewards", "group_ids", "behaviour_logprobs"),
    lam=0.5,
    eps_w=0.2,
    **PG_DEFAULTS,
)
def rlsd(inp: LossInputs, lam: float, eps_w: float, normalize_std: bool, clip_low: float,
         clip_high: float) -> LossOutput:
    """RLSD: GRPO advantage reweighted per token by the privileged-context teacher's agreement.

    RLSD (arXiv 2604.03128): the teacher cache is the model itself conditioned on privileged context c.
    Delta_t = sg(lT_t - log pi_theta(y_t)); w_t = exp(sign(A_GRPO) Delta_t); A_t = A_GRPO ((1 - lam) + lam
    clip(w_t, 1 - eps_w, 1 + eps_w)), PPO-clipped surrogate against pi_old. On a rewarded rollout the
    tokens the informed model prefers get more credit, on a penalised one the tokens it disfavours get more
    blame. lam 0.5 and eps_w 0.2 come from a re-implementation, not the paper (UNCONFIRMED; set lam, eps_w);
    the paper decays lam to 0 during training, which a schedule outside the loss must do.
    """
    logp = inp.student.token_logprobs()
    sequence = token_advantages(inp.rewards, inp.group_ids, inp.mask, normalize_std)
    weight = privileged_weight(opd_advantage(inp.teacher_logprobs, logp, 0.0), torch.sign(sequence), lam, eps_w)
    return ppo_loss(inp, logp, sequence * weight, clip_low, clip_high,
                    weight=masked_mean(weight, inp.mask).item())


@register_loss(
    "rlrt",
    paper="arXiv 2605.10781",
    needs=("teacher_logprobs", "rewards", "group_ids", "behaviour_logprobs"),
    lam=0.5,
    eps_w=0.2,
    threshold=0.5,
    **PG_DEFAULTS,
)
def rlrt(inp: LossInputs, lam: float, eps_w: float, threshold: float, normalize_std: bool, clip_low: float,
         clip_high: float) -> LossOutput:
    """RLRT: RLSD's reweighting with the swapped ratio, on successful rollouts only; plain GRPO elsewhere.

    RLRT (arXiv 2605.10781) up-weights, on successful rollouts (reward > threshold), the tokens where the
    student deviates from the teacher's preference: w_t = exp(-sign(A_GRPO) Delta_t) with Delta_t =
    sg(lT_t - log pi_theta(y_t)), A_t = A_GRPO ((1 - lam) + lam clip(w_t, 1 - eps_w, 1 + eps_w)); failed
    rollouts keep A_t = A_GRPO. PPO-clipped surrogate against pi_old. The exact form is UNCONFIRMED: this is
    our reading of the abstract as RLSD's formula with the sign swapped; lam, eps_w, threshold and the clip
    range are the knobs (lam=0 is plain GRPO).
    """
    logp = inp.student.token_logprobs()
    sequence = token_advantages(inp.rewards, inp.group_ids, inp.mask, normalize_std)
    swapped = privileged_weight(opd_advantage(inp.teacher_logprobs, logp, 0.0), -torch.sign(sequence), lam, eps_w)
    weight = torch.where(succeeded(inp, threshold), swapped, torch.ones_like(swapped))
    return ppo_loss(inp, logp, sequence * weight, clip_low, clip_high,
                    weight=masked_mean(weight, inp.mask).item())


@register_loss(
    "rlcsd",
    paper="arXiv 2606.11709",
    needs=("teacher_logprobs", "contrast_logprobs", "rewards", "group_ids", "behaviour_logprobs"),
    grpo_weight=1.0,
    coef=1.0,
    clip=10.0,
    **PG_DEFAULTS,
)
def rlcsd(inp: LossInputs, grpo_weight: float, coef: float, clip: float, normalize_std: bool, clip_low: float,
          clip_high: float) -> LossOutput:
    """RLCSD: GRPO advantage plus the contrast of the correct-hint and incorrect-hint teacher log-probs.

    RLCSD (arXiv 2606.11709): C_t = lT_t - lC_t with lT_t the sampled-token log-prob under the correct hint
    (the main score set) and lC_t under an incorrect hint sharing its template (`contrast_logprobs`): the
    style shift that any hint causes cancels, what remains is what the right answer tells about y_t.
    A_t = grpo_weight A_GRPO + coef clip(C_t, -clip, clip) (clip <= 0: off), PPO-clipped surrogate against
    pi_old. How the paper combines C_t with the outcome advantage, and the weights and clip, are
    UNCONFIRMED (grpo_weight, coef, clip; grpo_weight=0 is pure contrastive distillation).
    """
    logp = inp.student.token_logprobs()
    contrast = inp.teacher_logprobs - inp.contrast_logprobs
    if clip > 0:
        contrast = contrast.clamp(-clip, clip)
    advantage = grpo_weight * token_advantages(inp.rewards, inp.group_ids, inp.mask, normalize_std) + coef * contrast
    return ppo_loss(inp, logp, advantage, clip_low, clip_high, contrast=masked_mean(contrast, inp.mask).item())


@register_loss(
    "sdar",
    paper="arXiv 2605.15155",
    needs=("teacher_logprobs", "topk", "rewards", "group_ids", "behaviour_logprobs"),
    tau=1.0,
    lam=0.1,
    beta=0.0,
    opsd_tau=0.05,
    opsd_clip="token",
    **PG_DEFAULTS,
)
def sdar(inp: LossInputs, tau: float, lam: float, beta: float, opsd_tau: float, opsd_clip: str, normalize_std: bool,
         clip_low: float, clip_high: float) -> LossOutput:
    """SDAR: GRPO plus an OPSD distillation term gated per token by the teacher's preference.

    SDAR (arXiv 2605.15155): L = L_GRPO + lam mean_t(g_t div_t) with g_t = sigmoid(sg(D_t) / tau),
    D_t = lT_t - log pi_theta(y_t) (privileged-context teacher), so distillation is strongest where the
    teacher likes the sampled token more than the student does. div_t is OPSD's per-token term (`opsd`,
    arXiv 2601.18734: JSD_beta on the renormalised teacher top-k, clipped at opsd_tau; beta 0 = forward KL);
    L_GRPO is `grpo`. tau and lam are UNCONFIRMED (defaults 1.0 and 0.1; knobs tau, lam), as is the choice
    of OPSD's divergence (beta, opsd_tau).
    """
    logp = inp.student.token_logprobs()
    advantage = token_advantages(inp.rewards, inp.group_ids, inp.mask, normalize_std)
    gate = torch.sigmoid(opd_advantage(inp.teacher_logprobs, logp, 0.0) / tau)
    divergence, _ = opsd_per_token(inp, beta, opsd_tau, opsd_clip)
    distill = masked_mean(gate * divergence, inp.mask)
    out = ppo_loss(inp, logp, advantage, clip_low, clip_high,
                   distill=distill.item(), gate=masked_mean(gate, inp.mask).item())
    return LossOutput(out.loss + lam * distill, out.metrics)
