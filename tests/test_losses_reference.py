"""Every registered loss against a slow, obvious reference written here from the formulas.

The references loop over batch, position and vocabulary / top-k entries with scalar tensor arithmetic
(explicit softmax, explicit renormalisation and tail bucket, explicit KL sums, explicit sort for token
selection), share no code with lopd.losses, and are differentiated by autograd; values and gradients
w.r.t. the logits must agree with the vectorised losses in float64.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import pytest
import torch

from lopd.losses import REGISTRY, LossInputs, get_loss
from lopd.losses.student import StudentLogprobs, StudentRequest

B, T, V, K = 2, 5, 10, 4
EPS = 1e-6
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- inputs


def make_batch(seed: int = 0, k: int = K, teacher_is_student: bool = False, spread: float = 2.5) -> LossInputs:
    """Random tiny batch. The teacher is the student's logits plus noise of a per-position random scale
    (so divergences range from tiny to large); its top-k is the true top-k of that teacher."""
    return batch_and_teacher(seed, k, teacher_is_student, spread)[0]


def batch_and_teacher(seed: int, k: int, teacher_is_student: bool = False,
                      spread: float = 2.5) -> tuple[LossInputs, torch.Tensor]:
    """`make_batch`'s batch and the teacher's full-vocabulary log-probs [B, T, V] it was cut from."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 1.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=F64)
    mask[0, T - 1] = 0.0
    mask[1, 0] = 0.0
    scale = torch.rand(B, T, 1, generator=g, dtype=F64) * spread
    teacher_logits = logits + scale * torch.randn(B, T, V, generator=g, dtype=F64)
    if teacher_is_student:
        teacher_logits = logits.clone()
    teacher_full = torch.log_softmax(teacher_logits, dim=-1)
    topk_logprobs, topk_ids = teacher_full.topk(k, dim=-1)
    student_token = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return LossInputs(
        student=StudentLogprobs.from_logits(logits.requires_grad_(True), tokens, torch.ones_like(tokens), topk_ids),
        tokens=tokens,
        mask=mask,
        behaviour_logprobs=student_token + 0.5 * torch.randn(B, T, generator=g, dtype=F64),
        teacher_logprobs=teacher_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        base_logprobs=student_token + torch.randn(B, T, generator=g, dtype=F64),
    ), teacher_full


def for_request(inp: LossInputs, request: StudentRequest) -> LossInputs:
    """`inp` with the student quantities a loss declared (temperature, entropy), from the same logits."""
    student = StudentLogprobs.from_logits(inp.student.logits, inp.tokens, inp.mask, inp.topk_ids, request)
    return replace(inp, student=student)


# ------------------------------------------------------------------------------------ reference maths


def positions(inp: LossInputs) -> list[tuple[int, int]]:
    rows, steps = inp.mask.shape
    return [(b, t) for b in range(rows) for t in range(steps) if inp.mask[b, t].item() > 0]


def ref_mean(keep: list[tuple[int, int]], term: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=F64)
    for b, t in keep:
        total = total + term(b, t)
    return total / max(len(keep), 1)


def ref_probs(z: torch.Tensor, temperature: float = 1.0) -> list[torch.Tensor]:
    """Softmax over the vocabulary, one entry at a time."""
    exps = [torch.exp(z[v] / temperature) for v in range(z.shape[0])]
    total = sum(exps)
    return [e / total for e in exps]


def ref_token_logp(inp: LossInputs, b: int, t: int) -> torch.Tensor:
    return torch.log(ref_probs(inp.student.logits[b, t])[int(inp.tokens[b, t])])


def ref_entropy(inp: LossInputs, b: int, t: int) -> float:
    return -sum(p.item() * math.log(p.item()) for p in ref_probs(inp.student.logits[b, t]))


def ref_tail(masses: list[torch.Tensor]) -> torch.Tensor:
    rest = 1.0 - sum(masses)
    return rest if rest.item() > EPS else torch.tensor(EPS, dtype=F64)


def ref_support(inp: LossInputs, b: int, t: int, tail: bool = False, temperature: float = 1.0):
    """(student, teacher) probability lists on the teacher top-k: renormalised, or raw plus a tail bucket."""
    ids = [int(i) for i in inp.topk_ids[b, t]]
    student_full = ref_probs(inp.student.logits[b, t], temperature)
    student = [student_full[v] for v in ids]
    teacher = [torch.exp(inp.topk_logprobs[b, t, j] / temperature) for j in range(len(ids))]
    if tail:
        return student + [ref_tail(student)], teacher + [ref_tail(teacher)]
    s_total, t_total = sum(student), sum(teacher)
    return [q / s_total for q in student], [p / t_total for p in teacher]


def ref_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
    return sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q))


def ref_jsd(student: list, teacher: list, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return ref_kl(teacher, student)
    if beta == 1.0:
        return ref_kl(student, teacher)
    m = [beta * p + (1 - beta) * q for p, q in zip(teacher, student)]
    return beta * ref_kl(teacher, m) + (1 - beta) * ref_kl(student, m)


def ref_ppo(ratio: torch.Tensor, advantage: float, eps: float) -> torch.Tensor:
    """min(r A, clip(r) A), written out by the sign of A."""
    if advantage >= 0:
        return ratio * advantage if ratio.item() <= 1 + eps else torch.tensor((1 + eps) * advantage, dtype=F64)
    return ratio * advantage if ratio.item() >= 1 - eps else torch.tensor((1 - eps) * advantage, dtype=F64)


def clamp(x: float, c: float) -> float:
    return max(-c, min(c, x)) if c > 0 else x


def gap(inp: LossInputs, b: int, t: int) -> float:
    """lT - log pi_theta of the sampled token, as a plain float (detached)."""
    return inp.teacher_logprobs[b, t].item() - ref_token_logp(inp, b, t).item()


# ---------------------------------------------------------------------------------- reference losses


def ref_sft(inp: LossInputs) -> torch.Tensor:
    return ref_mean(positions(inp), lambda b, t: -ref_token_logp(inp, b, t))


def ref_lightning(inp: LossInputs, clip, importance_ratio, ppo_clip, baseline) -> torch.Tensor:
    keep = positions(inp)
    adv = {(b, t): clamp(gap(inp, b, t), clip) for b, t in keep}
    if baseline == "batch_mean":
        mean = sum(adv.values()) / len(adv)
        adv = {key: a - mean for key, a in adv.items()}

    def term(b, t):
        logp, beh = ref_token_logp(inp, b, t), inp.behaviour_logprobs[b, t]
        if ppo_clip > 0:
            return -ref_ppo(torch.exp(logp - beh), adv[b, t], ppo_clip)
        if importance_ratio:
            return -math.exp(logp.item() - beh.item()) * adv[b, t] * logp
        return -adv[b, t] * logp

    return ref_mean(keep, term)


def ref_opd_is(inp: LossInputs, coef, gamma, ppo_clip) -> torch.Tensor:
    raw = [[-coef * (inp.behaviour_logprobs[b, t].item() - inp.teacher_logprobs[b, t].item()) * inp.mask[b, t].item()
            for t in range(T)] for b in range(B)]
    adv = [[sum(gamma ** (s - t) * raw[b][s] for s in range(t, T)) for t in range(T)] for b in range(B)]

    def term(b, t):
        ratio = torch.exp(ref_token_logp(inp, b, t) - inp.behaviour_logprobs[b, t])
        return -(ref_ppo(ratio, adv[b][t], ppo_clip) if ppo_clip > 0 else ratio * adv[b][t])

    return ref_mean(positions(inp), term)


def ref_exopd(inp: LossInputs, lam, clip) -> torch.Tensor:
    def term(b, t):
        base = inp.base_logprobs[b, t].item()
        adv = lam * (inp.teacher_logprobs[b, t].item() - base) - (inp.behaviour_logprobs[b, t].item() - base)
        return -clamp(adv, clip) * ref_token_logp(inp, b, t)

    return ref_mean(positions(inp), term)


def ref_rkl_topk(inp: LossInputs, special_token_ids, entropy_top_ratio, tail) -> torch.Tensor:
    special = {int(s) for s in special_token_ids.split(",") if s}
    keep = [(b, t) for b, t in positions(inp) if int(inp.tokens[b, t]) not in special]
    if entropy_top_ratio < 1:
        ranked = sorted(keep, key=lambda bt: ref_entropy(inp, *bt), reverse=True)
        keep = ranked[: math.ceil(entropy_top_ratio * len(keep))]
    return ref_mean(keep, lambda b, t: ref_kl(*ref_support(inp, b, t, tail)))


def ref_tip(inp: LossInputs, ratio) -> torch.Tensor:
    return ref_rkl_topk(inp, "", ratio, False)


def ref_gkd(inp: LossInputs, beta, temperature) -> torch.Tensor:
    return ref_mean(positions(inp), lambda b, t: ref_jsd(*ref_support(inp, b, t, False, temperature), beta))


def ref_fkl(inp: LossInputs, tail: bool) -> torch.Tensor:
    def term(b, t):
        student, teacher = ref_support(inp, b, t, tail)
        return ref_kl(teacher, student)

    return ref_mean(positions(inp), term)


def ref_skew_kl(inp: LossInputs, alpha) -> torch.Tensor:
    def term(b, t):
        student, teacher = ref_support(inp, b, t)
        return ref_kl(teacher, [alpha * p + (1 - alpha) * q for p, q in zip(teacher, student)])

    return ref_mean(positions(inp), term)


def ref_skew_rkl(inp: LossInputs, alpha) -> torch.Tensor:
    def term(b, t):
        student, teacher = ref_support(inp, b, t)
        return ref_kl(student, [alpha * q + (1 - alpha) * p for p, q in zip(teacher, student)])

    return ref_mean(positions(inp), term)


def ref_teacher_entropy(inp: LossInputs, b: int, t: int) -> float:
    probs = [math.exp(lp) for lp in inp.topk_logprobs[b, t].tolist()]
    tail = max(1.0 - sum(probs), 0.0)
    return -sum(p * math.log(p) for p in probs) - (tail * math.log(tail) if tail > 0 else 0.0)


def ref_entropy_aware(inp: LossInputs, h_max, tail) -> torch.Tensor:
    h_max = h_max if h_max > 0 else math.log(V)

    def term(b, t):
        weight = min(max(ref_teacher_entropy(inp, b, t) / h_max, 0.0), 1.0)
        student, teacher = ref_support(inp, b, t, tail)
        return ref_kl(student, teacher) + weight * ref_kl(teacher, student)

    return ref_mean(positions(inp), term)


def ref_jsd_terms(student: list, teacher: list, beta: float) -> list:
    """JSD_beta's terms, one per support element (their sum is ref_jsd)."""
    def kl_term(p, q):
        return p * torch.log(p / q)

    if beta == 0.0:
        return [kl_term(p, q) for p, q in zip(teacher, student)]
    if beta == 1.0:
        return [kl_term(q, p) for p, q in zip(teacher, student)]
    m = [beta * p + (1 - beta) * q for p, q in zip(teacher, student)]
    return [beta * kl_term(p, mv) + (1 - beta) * kl_term(q, mv) for p, q, mv in zip(teacher, student, m)]


def ref_opsd_term(inp: LossInputs, b: int, t: int, beta, tau, clip: str = "token") -> torch.Tensor:
    student, teacher = ref_support(inp, b, t)
    capped = torch.tensor(tau, dtype=F64)
    if clip == "element":
        return sum(capped if tau > 0 and term.item() > tau else term for term in ref_jsd_terms(student, teacher, beta))
    div = ref_jsd(student, teacher, beta)
    return capped if tau > 0 and div.item() > tau else div


def ref_opsd(inp: LossInputs, beta, tau, clip) -> torch.Tensor:
    return ref_mean(positions(inp), lambda b, t: ref_opsd_term(inp, b, t, beta, tau, clip))


def ref_tropd(inp: LossInputs, threshold, clip, tail) -> torch.Tensor:
    def term(b, t):
        d = gap(inp, b, t)
        if min(math.exp(d), 1.0) >= threshold:
            return -clamp(d, clip) * ref_token_logp(inp, b, t)
        student, teacher = ref_support(inp, b, t, tail)
        return ref_kl(teacher, student)

    return ref_mean(positions(inp), term)


def ref_aopd(inp: LossInputs, negative_divergence, clip, tail) -> torch.Tensor:
    def term(b, t):
        adv = clamp(gap(inp, b, t), clip)
        if adv > 0:
            return -adv * ref_token_logp(inp, b, t)
        student, teacher = ref_support(inp, b, t, tail)
        return ref_kl(student, teacher) if negative_divergence == "rkl" else ref_kl(teacher, student)

    return ref_mean(positions(inp), term)


REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "sft": ref_sft,
    "lightning": ref_lightning,
    "opd_is": ref_opd_is,
    "exopd": ref_exopd,
    "rkl_topk": ref_rkl_topk,
    "tip": ref_tip,
    "gkd": ref_gkd,
    "fkl_topk": lambda inp: ref_fkl(inp, tail=False),
    "fkl_topk_tail": lambda inp: ref_fkl(inp, tail=True),
    "skew_kl": ref_skew_kl,
    "skew_rkl": ref_skew_rkl,
    "entropy_aware": ref_entropy_aware,
    "opsd": ref_opsd,
    "tropd": ref_tropd,
    "aopd": ref_aopd,
}

CASES: list[tuple[str, dict]] = [
    ("sft", {}),
    ("lightning", {}),
    ("lightning", {"clip": 0.5}),
    ("lightning", {"importance_ratio": True}),
    ("lightning", {"ppo_clip": 0.2}),
    ("lightning", {"baseline": "batch_mean"}),
    ("lightning", {"ppo_clip": 0.2, "baseline": "batch_mean", "clip": 1.0}),
    ("opd_is", {}),
    ("opd_is", {"coef": 0.5, "gamma": 0.9}),
    ("opd_is", {"ppo_clip": 0.2}),
    ("exopd", {}),
    ("exopd", {"lam": 1.0}),
    ("exopd", {"clip": 0.5}),
    ("exopd", {"clip": 0.0}),
    ("rkl_topk", {}),
    ("rkl_topk", {"special_token_ids": "1,3"}),
    ("rkl_topk", {"entropy_top_ratio": 0.4}),
    ("rkl_topk", {"tail": True}),
    ("rkl_topk", {"special_token_ids": "1,3", "entropy_top_ratio": 0.2, "tail": True}),
    ("tip", {}),
    ("tip", {"ratio": 0.3}),
    ("gkd", {}),
    ("gkd", {"beta": 0.0}),
    ("gkd", {"beta": 1.0}),
    ("gkd", {"beta": 0.3, "temperature": 0.7}),
    ("fkl_topk", {}),
    ("fkl_topk_tail", {}),
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_rkl", {}),
    ("entropy_aware", {}),
    ("entropy_aware", {"h_max": 1.5, "tail": True}),
    ("opsd", {}),
    ("opsd", {"beta": 0.5, "tau": 0.03}),
    ("opsd", {"tau": 0.0}),
    ("opsd", {"clip": "element"}),
    ("opsd", {"clip": "element", "beta": 0.5, "tau": 0.01}),
    ("tropd", {}),
    ("tropd", {"threshold": 0.5, "tail": True}),
    ("aopd", {}),
    ("aopd", {"negative_divergence": "fkl", "clip": 1.0, "tail": True}),
]


def case_id(name: str, overrides: dict) -> str:
    return "-".join([name, *(f"{key}={value}" for key, value in overrides.items())])


def run_loss(name: str, overrides: dict, inp: LossInputs):
    spec = get_loss(name)
    args = spec.resolve_args(overrides)
    out = spec.fn(for_request(inp, spec.student_request(args)), **args)
    (grad,) = torch.autograd.grad(out.loss, inp.student.logits)
    return out, grad


def run_reference(name: str, overrides: dict, inp: LossInputs):
    args = get_loss(name).resolve_args(overrides)
    value = REFERENCES[name](inp, **args)
    if not value.requires_grad:  # every kept token clipped: the reference is a constant
        return value, torch.zeros_like(inp.student.logits)
    (grad,) = torch.autograd.grad(value, inp.student.logits, allow_unused=True)
    return value, torch.zeros_like(inp.student.logits) if grad is None else grad


def test_every_registered_loss_has_a_reference_case():
    """Here or, for the outcome-aware and self-distillation losses, in test_losses_outcome_reference.py."""
    from test_losses_outcome_reference import REFERENCES as OUTCOME_REFERENCES

    assert set(REFERENCES).isdisjoint(OUTCOME_REFERENCES)
    assert set(REFERENCES) | set(OUTCOME_REFERENCES) == set(REGISTRY)
    assert {name for name, _ in CASES} == set(REFERENCES)


@pytest.mark.parametrize("name,overrides", CASES, ids=[case_id(*case) for case in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(name: str, overrides: dict, seed: int):
    inp = make_batch(seed)
    out, grad = run_loss(name, overrides, inp)
    ref, ref_grad = run_reference(name, overrides, inp)
    assert torch.allclose(out.loss, ref, rtol=1e-9, atol=1e-12), (out.loss.item(), ref.item())
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)
    assert all(isinstance(value, float) for value in out.metrics.values())
    assert grad.abs().sum() > 0 or name == "opsd"  # the case exercises a gradient


def test_reference_cases_exercise_both_branches():
    """The random data must put tokens on both sides of every switch the reference tests check."""
    inp = make_batch(0)
    for name, overrides, metric in [("tropd", {}, "pg_fraction"), ("aopd", {}, "pg_fraction"), ("opsd", {}, "clipped"),
                                    ("opsd", {"tau": 0.03, "beta": 0.5}, "clipped")]:
        out, _ = run_loss(name, overrides, inp)
        assert 0.0 < out.metrics[metric] < 1.0, (name, overrides, out.metrics)
    assert any(int(inp.tokens[b, t]) in (1, 3) for b, t in positions(inp))
    regions = set()  # PPO (eps 0.2): inside the range, clipped above with A > 0, clipped below with A < 0
    for seed in (0, 1):
        inp = make_batch(seed)
        for b, t in positions(inp):
            ratio = math.exp(ref_token_logp(inp, b, t).item() - inp.behaviour_logprobs[b, t].item())
            advantage = gap(inp, b, t)
            regions.add("inside" if abs(ratio - 1) < 0.2 else "above" if ratio > 1.2 and advantage > 0 else
                        "below" if ratio < 0.8 and advantage < 0 else "unclipped")
    assert {"inside", "above", "below"} <= regions


# --------------------------------------------------------------------- zero at teacher == student

ZERO_CASES: list[tuple[str, dict]] = [
    (name, overrides)
    for name, overrides in CASES
    if name not in ("sft", "lightning", "opd_is", "exopd")
] + [
    ("lightning", {}),
    ("lightning", {"importance_ratio": True}),
    ("lightning", {"ppo_clip": 0.2, "baseline": "batch_mean"}),
]


@pytest.mark.parametrize("k", [V, K], ids=["K=V", "K<V"])
@pytest.mark.parametrize("name,overrides", ZERO_CASES, ids=[case_id(*case) for case in ZERO_CASES])
def test_zero_when_teacher_is_student(name: str, overrides: dict, k: int):
    """Teacher top-k built from the student's own log-probs: every divergence (renormalised or with a
    tail bucket) and every OPD advantage vanishes, and so does the gradient."""
    inp = make_batch(3, k=k, teacher_is_student=True)
    out, grad = run_loss(name, overrides, inp)
    assert abs(out.loss.item()) < 1e-10
    assert grad.abs().max().item() < 1e-10


def test_lightning_zero_advantage_when_teacher_is_student():
    inp = make_batch(4, teacher_is_student=True)
    out, grad = run_loss("lightning", {}, inp)
    assert out.metrics["advantage"] == pytest.approx(0.0, abs=1e-12)
    assert torch.count_nonzero(grad.abs() > 1e-12) == 0


# ------------------------------------------------------------------------------------- study metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_lightning_reports_the_advantage_mean_and_variance(seed: int):
    """The per-token advantage clip(log pi_T - log pi_theta) over kept tokens, its mean and population variance."""
    inp = make_batch(seed)
    out, _ = run_loss("lightning", {"clip": 1.0}, inp)
    advantages = [clamp(gap(inp, b, t), 1.0) for b, t in positions(inp)]
    mean = sum(advantages) / len(advantages)
    assert out.metrics["advantage"] == pytest.approx(mean, rel=1e-9)
    assert out.metrics["advantage_var"] == pytest.approx(sum((a - mean) ** 2 for a in advantages) / len(advantages),
                                                         rel=1e-9)


@pytest.mark.parametrize("k", [1, K])
def test_teacher_kl_is_the_tail_bucket_kl_and_bounds_the_full_kl(k: int):
    """The training metric `teacher_kl`: KL(student || teacher) over the teacher's top-k plus one tail bucket, which
    never exceeds the full-vocabulary reverse KL (coarse-graining loses information), for any k including 1."""
    from lopd.losses.topk import teacher_kl

    inp, teacher = batch_and_teacher(0, k, spread=1.0)
    keep = positions(inp)
    expected = ref_mean(keep, lambda b, t: ref_kl(*ref_support(inp, b, t, tail=True)))
    assert teacher_kl(inp).item() == pytest.approx(expected.item(), rel=1e-9)
    student = torch.log_softmax(inp.student.logits.detach(), dim=-1)
    full = ref_mean(keep, lambda b, t: (student[b, t].exp() * (student[b, t] - teacher[b, t])).sum())
    assert 0.0 < teacher_kl(inp).item() <= full.item()
    assert not teacher_kl(inp).requires_grad
