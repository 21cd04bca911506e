"""The outcome-aware and self-distillation losses against slow, obvious references written here.

Same approach as test_losses_reference.py: the references loop over rollouts, positions, steps, groups
and top-k entries with scalar tensor arithmetic (explicit softmax, group means and stds, step runs, PPO
clip written out by the sign of the advantage, explicit JSD sums), share no code with lopd.losses, and
are differentiated by autograd; values and gradients w.r.t. the logits must agree in float64.

The batch has three groups of rollouts, listed interleaved: one with mixed fractional rewards, one with
a correct and a failed rollout, and one whose rewards are all equal; the masks have padding and
tool-observation zeros inside the response, so agent trajectories have several steps.
"""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from lopd.losses import REGISTRY, LossInputs, get_loss
from lopd.losses.student import StudentLogprobs

# The divergence references of registry I serve here too (they are shape-agnostic).
from test_losses_reference import for_request, positions, ref_jsd, ref_mean, ref_opsd_term, ref_probs, ref_support

T, V, K = 8, 10, 4
EPS = 1e-6  # tail floor of the top-k support
STD_EPS = 1e-6  # GRPO's std epsilon
F64 = torch.float64

GROUP_IDS = [5, 2, 5, 9, 2, 5, 9]
REWARDS = [1.0, 0.0, 0.2, 1.0, 1.0, 0.7, 1.0]  # group 5 mixed, group 2 one of each, group 9 all equal
EQUAL_GROUP = 9
MASKS = [
    [1, 1, 0, 0, 1, 1, 1, 0],  # two steps, padding
    [1, 1, 1, 0, 1, 0, 1, 1],  # three steps
    [0, 1, 1, 1, 1, 1, 0, 0],  # leading observation, one step
    [1, 0, 1, 1, 0, 0, 1, 1],  # three steps
    [1, 1, 1, 1, 1, 1, 1, 1],  # one step, no observation
    [1, 1, 0, 1, 0, 1, 1, 0],  # three steps
    [1, 1, 1, 0, 0, 1, 1, 1],  # two steps
]
B = len(GROUP_IDS)

OUTCOME_LOSSES = {"grpo", "sod", "uni_opd", "srpo", "sdpo", "rlsd", "rlrt", "rlcsd", "sdar", "ropd"}


# ----------------------------------------------------------------------------------------------- inputs


def make_batch(seed: int = 0, k: int = K, teacher_is_student: bool = False, spread: float = 2.5,
               rewards: list[float] | None = None) -> LossInputs:
    """Random tiny batch. The (privileged-context) teacher is the student's logits plus noise of a random
    per-position scale, its top-k the true top-k; the contrast teacher is another such noisy copy."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 1.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    scale = torch.rand(B, T, 1, generator=g, dtype=F64) * spread
    teacher_logits = logits + scale * torch.randn(B, T, V, generator=g, dtype=F64)
    if teacher_is_student:
        teacher_logits = logits.clone()
    contrast_logits = logits + scale * torch.randn(B, T, V, generator=g, dtype=F64)
    teacher_full = torch.log_softmax(teacher_logits, dim=-1)
    topk_logprobs, topk_ids = teacher_full.topk(k, dim=-1)
    student_token = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    rubric = torch.rand(B, generator=g, dtype=F64)
    rubric[GROUP_IDS.index(EQUAL_GROUP)] = rubric[len(GROUP_IDS) - 1 - GROUP_IDS[::-1].index(EQUAL_GROUP)]
    return LossInputs(
        student=StudentLogprobs.from_logits(logits.requires_grad_(True), tokens, torch.ones_like(tokens), topk_ids),
        tokens=tokens,
        mask=torch.tensor(MASKS, dtype=F64),
        behaviour_logprobs=student_token + 0.5 * torch.randn(B, T, generator=g, dtype=F64),
        teacher_logprobs=teacher_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        rewards=torch.tensor(REWARDS if rewards is None else rewards, dtype=F64),
        group_ids=torch.tensor(GROUP_IDS),
        contrast_logprobs=torch.log_softmax(contrast_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        rubric_rewards=rubric,
    )


# ------------------------------------------------------------------------------------ reference maths


def ref_token_logp(inp: LossInputs, b: int, t: int) -> torch.Tensor:
    return torch.log(ref_probs(inp.student.logits[b, t])[int(inp.tokens[b, t])])


def gap(inp: LossInputs, b: int, t: int) -> float:
    """D_t = lT - log pi_theta of the sampled token, detached."""
    return inp.teacher_logprobs[b, t].item() - ref_token_logp(inp, b, t).item()


def sign(x: float) -> float:
    return 1.0 if x > 0 else -1.0 if x < 0 else 0.0


def clamp(x: float, c: float) -> float:
    return max(-c, min(c, x)) if c > 0 else x


def ref_group_advantages(rewards: list[float], normalize_std: bool) -> list[float]:
    """(r - group mean) / (group population std + eps), looping over the rollouts of each group."""
    out = []
    for b in range(B):
        members = [rewards[i] for i in range(B) if GROUP_IDS[i] == GROUP_IDS[b]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / len(members))
        out.append((rewards[b] - mean) / (std + STD_EPS) if normalize_std else rewards[b] - mean)
    return out


def ref_ppo(ratio: torch.Tensor, advantage: float, clip_low: float, clip_high: float) -> torch.Tensor:
    """min(r A, clip(r, 1 - low, 1 + high) A), written out by the sign of A; a bound <= 0 is no clip."""
    if advantage >= 0:
        if clip_high <= 0 or ratio.item() <= 1 + clip_high:
            return ratio * advantage
        return torch.tensor((1 + clip_high) * advantage, dtype=F64)
    if clip_low <= 0 or ratio.item() >= 1 - clip_low:
        return ratio * advantage
    return torch.tensor((1 - clip_low) * advantage, dtype=F64)


def ref_ratio(inp: LossInputs, b: int, t: int) -> torch.Tensor:
    return torch.exp(ref_token_logp(inp, b, t) - inp.behaviour_logprobs[b, t])


def ref_pg(inp: LossInputs, advantage: Callable[[int, int], float], clip_low: float, clip_high: float) -> torch.Tensor:
    """-token-mean of the clipped surrogate with the given per-token advantage."""
    return ref_mean(positions(inp), lambda b, t: -ref_ppo(ref_ratio(inp, b, t), advantage(b, t), clip_low, clip_high))


def ref_teacher_entropy(inp: LossInputs, b: int, t: int) -> float:
    probs = [math.exp(lp) for lp in inp.topk_logprobs[b, t].tolist()]
    tail = max(1.0 - sum(probs), 0.0)
    return -sum(p * math.log(p) for p in probs) - (tail * math.log(tail) if tail > 0 else 0.0)


def ref_steps(inp: LossInputs, b: int) -> list[list[int]]:
    """Maximal runs of mask 1 along the row."""
    steps, current = [], []
    for t in range(T):
        if inp.mask[b, t].item() > 0:
            current.append(t)
        elif current:
            steps.append(current)
            current = []
    if current:
        steps.append(current)
    return steps


def ref_sod_weights(inp: LossInputs, eps: float, delta: float) -> dict[tuple[int, int], float]:
    weights = {}
    for b in range(B):
        steps = ref_steps(inp, b)
        drift = [sum(abs(inp.behaviour_logprobs[b, t].item() - inp.teacher_logprobs[b, t].item()) for t in step)
                 / len(step) for step in steps]
        for step, d in zip(steps, drift):
            for t in step:
                weights[b, t] = min((drift[0] + eps) / (d + eps), 1 + delta)
    return weights


def ref_rlsd_weight(inp: LossInputs, b: int, t: int, sgn: float, lam: float, eps_w: float) -> float:
    w = math.exp(sgn * gap(inp, b, t))
    return (1 - lam) + lam * min(max(w, 1 - eps_w), 1 + eps_w)


# ---------------------------------------------------------------------------------- reference losses


def ref_grpo(inp: LossInputs, normalize_std, clip_low, clip_high, rewards=None) -> torch.Tensor:
    adv = ref_group_advantages(inp.rewards.tolist() if rewards is None else rewards, normalize_std)
    return ref_pg(inp, lambda b, t: adv[b], clip_low, clip_high)


def ref_ropd(inp: LossInputs, normalize_std, clip_low, clip_high) -> torch.Tensor:
    return ref_grpo(inp, normalize_std, clip_low, clip_high, rewards=inp.rubric_rewards.tolist())


def ref_sod(inp: LossInputs, eps, delta, c, normalize_std, clip_low, clip_high) -> torch.Tensor:
    adv = ref_group_advantages(inp.rewards.tolist(), normalize_std)
    weights = ref_sod_weights(inp, eps, delta)

    def advantage(b, t):
        signal = inp.teacher_logprobs[b, t].item() - inp.behaviour_logprobs[b, t].item()
        return adv[b] + c * weights[b, t] * signal

    return ref_pg(inp, advantage, clip_low, clip_high)


def ref_uni_opd_shifts(inp: LossInputs, clip, threshold, delta, direction, mode) -> list[float]:
    keep = positions(inp)
    per_rollout = {}
    for b in range(B):
        own = [clamp(gap(inp, b, t), clip) for bb, t in keep if bb == b]
        if own:
            per_rollout[b] = sum(own) / len(own)
    bumps = [0.0] * B
    for group in set(GROUP_IDS):
        members = [b for b in range(B) if GROUP_IDS[b] == group and b in per_rollout]
        right = [per_rollout[b] for b in members if reward_of(inp, b) > threshold]
        wrong = [per_rollout[b] for b in members if reward_of(inp, b) <= threshold]
        if not right or not wrong:
            continue
        mu_c = sum(right) / len(right) if mode == "mean" else min(right)
        mu_w = sum(wrong) / len(wrong) if mode == "mean" else max(wrong)
        if mu_c - mu_w >= delta:
            continue
        s = mu_w - mu_c + delta
        up, down = {"both": (s / 2, s / 2), "correct_up": (s, 0.0), "incorrect_down": (0.0, s)}[direction]
        for b in range(B):
            if GROUP_IDS[b] == group:
                bumps[b] = up if reward_of(inp, b) > threshold else -down
    return bumps


def reward_of(inp: LossInputs, b: int) -> float:
    return inp.rewards[b].item()


def ref_uni_opd(inp: LossInputs, clip, threshold, delta, direction, mode) -> torch.Tensor:
    bumps = ref_uni_opd_shifts(inp, clip, threshold, delta, direction, mode)
    return ref_mean(positions(inp), lambda b, t: -(clamp(gap(inp, b, t), clip) + bumps[b]) * ref_token_logp(inp, b, t))


def ref_rlsd(inp: LossInputs, lam, eps_w, normalize_std, clip_low, clip_high) -> torch.Tensor:
    adv = ref_group_advantages(inp.rewards.tolist(), normalize_std)
    return ref_pg(inp, lambda b, t: adv[b] * ref_rlsd_weight(inp, b, t, sign(adv[b]), lam, eps_w), clip_low, clip_high)


def ref_rlrt(inp: LossInputs, lam, eps_w, threshold, normalize_std, clip_low, clip_high) -> torch.Tensor:
    adv = ref_group_advantages(inp.rewards.tolist(), normalize_std)

    def advantage(b, t):
        if reward_of(inp, b) <= threshold:
            return adv[b]
        return adv[b] * ref_rlsd_weight(inp, b, t, -sign(adv[b]), lam, eps_w)

    return ref_pg(inp, advantage, clip_low, clip_high)


def ref_rlcsd(inp: LossInputs, grpo_weight, coef, clip, normalize_std, clip_low, clip_high) -> torch.Tensor:
    adv = ref_group_advantages(inp.rewards.tolist(), normalize_std)

    def advantage(b, t):
        contrast = inp.teacher_logprobs[b, t].item() - inp.contrast_logprobs[b, t].item()
        return grpo_weight * adv[b] + coef * clamp(contrast, clip)

    return ref_pg(inp, advantage, clip_low, clip_high)


def ref_sdar(inp: LossInputs, tau, lam, beta, opsd_tau, opsd_clip, normalize_std, clip_low, clip_high) -> torch.Tensor:
    policy = ref_grpo(inp, normalize_std, clip_low, clip_high)

    def term(b, t):
        gate = 1.0 / (1.0 + math.exp(-gap(inp, b, t) / tau))
        return gate * ref_opsd_term(inp, b, t, beta, opsd_tau, opsd_clip)

    return policy + lam * ref_mean(positions(inp), term)


def ref_sdpo(inp: LossInputs, alpha, tail) -> torch.Tensor:
    return ref_mean(positions(inp), lambda b, t: ref_jsd(*ref_support(inp, b, t, tail), alpha))


def ref_srpo(inp: LossInputs, threshold, alpha, tail, distill_coef, entropy_weight, normalize_std, clip_low,
             clip_high) -> torch.Tensor:
    adv = ref_group_advantages(inp.rewards.tolist(), normalize_std)

    def term(b, t):
        if reward_of(inp, b) > threshold:
            return -ref_ppo(ref_ratio(inp, b, t), adv[b], clip_low, clip_high)
        div = ref_jsd(*ref_support(inp, b, t, tail), alpha)
        if entropy_weight:
            div = div * (1.0 - min(max(ref_teacher_entropy(inp, b, t) / math.log(V), 0.0), 1.0))
        return distill_coef * div

    return ref_mean(positions(inp), term)


REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": ref_grpo,
    "ropd": ref_ropd,
    "sod": ref_sod,
    "uni_opd": ref_uni_opd,
    "rlsd": ref_rlsd,
    "rlrt": ref_rlrt,
    "rlcsd": ref_rlcsd,
    "sdar": ref_sdar,
    "sdpo": ref_sdpo,
    "srpo": ref_srpo,
}

CASES: list[tuple[str, dict]] = [
    ("grpo", {}),
    ("grpo", {"normalize_std": False}),
    ("grpo", {"clip_low": 0.1, "clip_high": 0.1}),
    ("grpo", {"clip_high": 0.0}),
    ("ropd", {}),
    ("ropd", {"normalize_std": False, "clip_high": 0.2}),
    ("sod", {}),
    ("sod", {"delta": 0.5, "c": 0.5}),
    ("sod", {"delta": 5.0, "normalize_std": False}),
    ("uni_opd", {}),
    ("uni_opd", {"direction": "correct_up"}),
    ("uni_opd", {"direction": "incorrect_down", "delta": 1.0}),
    ("uni_opd", {"mode": "minmax"}),
    ("uni_opd", {"mode": "minmax", "clip": 0.5, "threshold": 0.1}),
    ("rlsd", {}),
    ("rlsd", {"lam": 1.0, "eps_w": 0.5}),
    ("rlsd", {"lam": 0.0}),
    ("rlrt", {}),
    ("rlrt", {"lam": 1.0, "eps_w": 0.5, "threshold": 0.1}),
    ("rlcsd", {}),
    ("rlcsd", {"grpo_weight": 0.0, "coef": 0.5, "clip": 0.3}),
    ("rlcsd", {"clip": 0.0}),
    ("sdar", {}),
    ("sdar", {"tau": 0.3, "lam": 1.0, "beta": 0.5, "opsd_tau": 0.03}),
    ("sdar", {"opsd_tau": 0.0}),
    ("sdar", {"opsd_clip": "element", "opsd_tau": 0.01}),
    ("sdpo", {}),
    ("sdpo", {"alpha": 0.0}),
    ("sdpo", {"alpha": 1.0}),
    ("sdpo", {"alpha": 0.3, "tail": False}),
    ("srpo", {}),
    ("srpo", {"entropy_weight": True}),
    ("srpo", {"alpha": 1.0, "tail": False, "distill_coef": 0.5, "threshold": 0.1}),
]


def case_id(name: str, overrides: dict) -> str:
    return "-".join([name, *(f"{key}={value}" for key, value in overrides.items())])


def run_loss(name: str, overrides: dict, inp: LossInputs):
    spec = get_loss(name)
    spec.check_inputs(inp.available())
    args = spec.resolve_args(overrides)
    out = spec.fn(for_request(inp, spec.student_request(args)), **args)
    (grad,) = torch.autograd.grad(out.loss, inp.student.logits)
    return out, grad


def run_reference(name: str, overrides: dict, inp: LossInputs):
    args = get_loss(name).resolve_args(overrides)
    value = REFERENCES[name](inp, **args)
    if not value.requires_grad:
        return value, torch.zeros_like(inp.student.logits)
    (grad,) = torch.autograd.grad(value, inp.student.logits, allow_unused=True)
    return value, torch.zeros_like(inp.student.logits) if grad is None else grad


def test_every_outcome_loss_has_a_reference_case():
    assert set(REFERENCES) == OUTCOME_LOSSES
    assert OUTCOME_LOSSES <= set(REGISTRY)
    assert {name for name, _ in CASES} == OUTCOME_LOSSES


@pytest.mark.parametrize("name,overrides", CASES, ids=[case_id(*case) for case in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(name: str, overrides: dict, seed: int):
    inp = make_batch(seed)
    out, grad = run_loss(name, overrides, inp)
    ref, ref_grad = run_reference(name, overrides, inp)
    assert torch.allclose(out.loss, ref, rtol=1e-9, atol=1e-12), (out.loss.item(), ref.item())
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)
    assert all(isinstance(value, float) for value in out.metrics.values())
    assert grad.abs().sum() > 0


# ------------------------------------------------------------------ the data exercises every branch


def test_batch_has_steps_groups_and_mixed_rewards():
    inp = make_batch(0)
    assert max(len(ref_steps(inp, b)) for b in range(B)) >= 3
    assert any(inp.mask[b, 0] == 0 and inp.mask[b, 1] == 1 for b in range(B))  # leading observation
    adv = ref_group_advantages(REWARDS, True)
    assert all(adv[b] == 0 for b in range(B) if GROUP_IDS[b] == EQUAL_GROUP)
    assert any(a > 0 for a in adv) and any(a < 0 for a in adv)


def test_reference_cases_exercise_every_branch():
    """Across the two seeds, tokens land on both sides of every switch the reference tests check."""
    ppo, sod_weights, rlsd_weights, sdar_clip, uni_shift = set(), set(), set(), set(), set()
    for seed in (0, 1):
        inp = make_batch(seed)
        adv = ref_group_advantages(REWARDS, True)
        for b, t in positions(inp):
            ratio, a = ref_ratio(inp, b, t).item(), adv[b]
            ppo.add("zero" if a == 0 else "inside" if 0.8 <= ratio <= 1.2 else
                    "clip_higher_only" if a > 0 and 1.2 < ratio <= 1.28 else
                    "above" if a > 0 and ratio > 1.28 else "below" if a < 0 and ratio < 0.8 else "unclipped")
            w = math.exp(sign(a) * gap(inp, b, t))
            rlsd_weights.add("zero" if a == 0 else "inside" if 0.8 <= w <= 1.2 else "clipped")
            div = ref_jsd(*ref_support(inp, b, t, tail=False), 0.0).item()
            sdar_clip.add(div > 0.05)
        for weight in ref_sod_weights(inp, 1e-6, 0.2).values():
            sod_weights.add("capped" if weight == 1.2 else "one" if weight == 1.0 else "below" if weight < 1 else "up")
        bumps = ref_uni_opd_shifts(inp, 10.0, 0.5, 0.4, "both", "mean")
        uni_shift.update(bump != 0 for b, bump in enumerate(bumps) if GROUP_IDS[b] != EQUAL_GROUP)
    assert {"zero", "inside", "clip_higher_only", "above", "below", "unclipped"} <= ppo, ppo
    assert {"zero", "inside", "clipped"} <= rlsd_weights, rlsd_weights
    assert {"capped", "one", "below"} <= sod_weights, sod_weights  # first step, clamped at 1 + delta, not
    assert sdar_clip == {True, False}
    assert uni_shift == {True, False}


def test_uni_opd_shifts_some_mixed_groups_only():
    """Two of the three groups have correct and incorrect rollouts; across the seeds a mixed group is shifted
    (its correct rollouts do not lead by delta) and another is not, and the all-equal group never is."""
    shifted = {run_loss("uni_opd", {}, make_batch(seed))[0].metrics["shifted_groups"] for seed in (0, 1)}
    assert any(0.0 < value < 2 / 3 - 1e-9 for value in shifted), shifted
    assert max(shifted) <= 2 / 3 + 1e-9


def test_srpo_routes_both_ways():
    out, _ = run_loss("srpo", {}, make_batch(0))
    assert 0.0 < out.metrics["grpo_fraction"] < 1.0


# --------------------------------------------------------------------- zero cases


ZERO_CASES: list[tuple[str, dict]] = [
    ("sdpo", {}),
    ("sdpo", {"alpha": 0.0}),
    ("sdpo", {"alpha": 1.0}),
    ("sdpo", {"alpha": 0.3, "tail": False}),
    ("srpo", {"threshold": 2.0}),  # every rollout failed: pure distillation
    ("srpo", {"threshold": 2.0, "entropy_weight": True, "tail": False}),
]


@pytest.mark.parametrize("k", [V, K], ids=["K=V", "K<V"])
@pytest.mark.parametrize("name,overrides", ZERO_CASES, ids=[case_id(*case) for case in ZERO_CASES])
def test_divergence_zero_when_teacher_is_student(name: str, overrides: dict, k: int):
    """Teacher top-k built from the student's own log-probs: the divergence and its gradient vanish."""
    inp = make_batch(3, k=k, teacher_is_student=True)
    out, grad = run_loss(name, overrides, inp)
    assert abs(out.loss.item()) < 1e-10
    assert grad.abs().max().item() < 1e-10


@pytest.mark.parametrize("name,overrides", [
    ("grpo", {}), ("grpo", {"normalize_std": False}), ("ropd", {}), ("rlsd", {}), ("rlrt", {}),
    ("srpo", {"threshold": 0.1}),
])
def test_group_with_equal_rewards_gets_no_gradient(name: str, overrides: dict):
    """A group whose rewards (outcome or rubric) are all equal has A_GRPO = 0: its rollouts add no gradient,
    while the other groups do."""
    inp = make_batch(0)
    _, grad = run_loss(name, overrides, inp)
    for b in range(B):
        row = grad[b].abs().max().item()
        if GROUP_IDS[b] == EQUAL_GROUP:
            assert row == 0.0, (b, row)
        else:
            assert row > 0.0, b


def test_grpo_all_equal_rewards_zero_loss_and_gradient():
    inp = make_batch(0, rewards=[0.5] * B)
    out, grad = run_loss("grpo", {}, inp)
    assert out.loss.item() == 0.0 and out.metrics["advantage"] == 0.0
    assert torch.count_nonzero(grad) == 0
