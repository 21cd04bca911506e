"""The loss registry: names, paper citations, declared and run-time input needs, argument parsing."""
from __future__ import annotations

import pytest
import torch

from lopd.errors import LopdError
from lopd.losses import REGISTRY, LossInputs, describe_losses, get_loss
from lopd.losses.base import FIELD_SOURCES
from lopd.losses.student import StudentLogprobs
from lopd.losses.topk import topk_support
from test_losses_reference import for_request

EXPECTED = {
    "sft", "lightning", "rkl_topk", "opd_is", "gkd", "fkl_topk", "fkl_topk_tail", "skew_kl", "skew_rkl",
    "entropy_aware", "tip", "tropd", "aopd", "exopd", "opsd",
    "grpo", "sod", "uni_opd", "srpo", "sdpo", "rlsd", "rlrt", "rlcsd", "sdar", "ropd",
}


def bare_inputs(**fields: torch.Tensor) -> LossInputs:
    """A 1 x 3 x 5 batch with only the fields given (student log-probs, tokens and mask always present)."""
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.tensor([[0, 2, 4]]), torch.ones(1, 3)
    logits = torch.randn(1, 3, 5, generator=g, requires_grad=True)
    student = StudentLogprobs.from_logits(logits, tokens, mask, fields.get("topk_ids"))
    return LossInputs(student=student, tokens=tokens, mask=mask, **fields)


def test_registry_has_every_loss():
    assert EXPECTED <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(EXPECTED - {"sft"}))
def test_papers_cite_arxiv(name: str):
    assert "arXiv" in get_loss(name).paper


def test_describe_losses_lists_every_loss_with_a_summary():
    rows = describe_losses()
    assert [row["name"] for row in rows] == sorted(REGISTRY)
    for row in rows:
        assert set(row) == {"name", "paper", "needs", "defaults", "summary"}
        assert row["summary"] and not row["summary"].endswith("\n")
        assert all(need in FIELD_SOURCES for need in row["needs"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_declared_field_is_named(name: str):
    spec = get_loss(name)
    for need in spec.needs:
        have = {"tokens", "mask", *FIELD_SOURCES} - {need}
        with pytest.raises(LopdError, match=f"needs '{need}'") as err:
            spec.check_inputs(have)
        assert FIELD_SOURCES[need] in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [{"importance_ratio": True}, {"ppo_clip": 0.2}])
def test_lightning_options_need_behaviour_logprobs_at_run_time(overrides: dict):
    spec = get_loss("lightning")
    inp = bare_inputs(teacher_logprobs=torch.zeros(1, 3))
    spec.check_inputs(inp.available())  # statically only the teacher is needed
    with pytest.raises(LopdError, match="needs 'behaviour_logprobs'") as err:
        spec.fn(inp, **spec.resolve_args(overrides))
    assert FIELD_SOURCES["behaviour_logprobs"] in str(err.value)


def test_lightning_defaults_run_without_behaviour_logprobs():
    spec = get_loss("lightning")
    out = spec.fn(bare_inputs(teacher_logprobs=torch.zeros(1, 3)), **spec.resolve_args({}))
    assert torch.isfinite(out.loss)


def test_cli_strings_are_coerced_to_the_default_types():
    args = get_loss("rkl_topk").resolve_args({"tail": "true", "special_token_ids": "1,2", "entropy_top_ratio": "0.2"})
    assert args == {"tail": True, "special_token_ids": "1,2", "entropy_top_ratio": 0.2}
    assert get_loss("lightning").resolve_args({"importance_ratio": "on"})["importance_ratio"] is True


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("lightning", {"baseline": "group"}, "baseline"),
        ("aopd", {"negative_divergence": "jsd"}, "negative_divergence"),
        ("gkd", {"beta": 1.5}, "beta"),
        ("rkl_topk", {"entropy_top_ratio": 0.0}, "ratio"),
        ("rkl_topk", {"special_token_ids": "1,x"}, "special_token_ids"),
    ],
)
def test_bad_knob_values_raise_lopd_errors(name: str, overrides: dict, message: str):
    ids = torch.tensor([[[0, 1], [2, 3], [4, 0]]])
    inp = bare_inputs(
        teacher_logprobs=torch.full((1, 3), -1.0),
        topk_ids=ids,
        topk_logprobs=torch.full((1, 3, 2), -1.0),
    )
    spec = get_loss(name)
    args = spec.resolve_args(overrides)
    with pytest.raises(LopdError, match=message):
        spec.fn(for_request(inp, spec.student_request(args)), **args)


def test_bf16_logits_are_upcast_and_padding_minus_inf_stays_finite():
    """Mixed-precision logits and a -inf teacher entry (padding) must not give NaN losses or grads."""
    logits = torch.randn(1, 3, 5).to(torch.bfloat16).requires_grad_(True)
    topk_logprobs = torch.tensor([[[-0.5, -1.5], [-0.2, float("-inf")], [-1.0, -1.0]]])
    tokens, mask, topk_ids = torch.tensor([[0, 2, 4]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[[0, 1], [2, 3], [4, 0]]])
    names = ("rkl_topk", "fkl_topk", "fkl_topk_tail", "gkd", "skew_kl", "skew_rkl", "entropy_aware", "opsd", "sdpo")
    for name in names:
        inp = LossInputs(
            student=StudentLogprobs.from_logits(logits, tokens, mask, topk_ids), tokens=tokens, mask=mask,
            topk_ids=topk_ids, topk_logprobs=topk_logprobs,
        )
        spec = get_loss(name)
        out = spec.fn(inp, **spec.resolve_args({}))
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert torch.isfinite(out.loss) and torch.isfinite(grad.float()).all(), name


@pytest.mark.parametrize("overrides,message", [({"direction": "up"}, "direction"), ({"mode": "max"}, "mode")])
def test_uni_opd_bad_choices_raise_lopd_errors(overrides: dict, message: str):
    inp = bare_inputs(
        teacher_logprobs=torch.full((1, 3), -1.0), rewards=torch.ones(1), group_ids=torch.zeros(1, dtype=torch.long)
    )
    spec = get_loss("uni_opd")
    with pytest.raises(LopdError, match=message):
        spec.fn(inp, **spec.resolve_args(overrides))


@pytest.mark.parametrize("name", ["grpo", "sod", "uni_opd", "rlsd", "rlrt", "rlcsd", "sdar", "srpo", "ropd"])
def test_outcome_losses_accept_float32_rewards_with_float32_logits(name: str):
    """Rewards arrive as float32 and group ids as int64 from the DataLoader; nothing may promote or fail."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    tokens, mask, topk_ids = torch.randint(0, 5, (4, 3), generator=g), torch.tensor([[1.0, 0.0, 1.0]] * 4), torch.tensor([[[0, 1]] * 3] * 4)
    inp = LossInputs(
        student=StudentLogprobs.from_logits(logits, tokens, mask, topk_ids), tokens=tokens, mask=mask,
        behaviour_logprobs=torch.full((4, 3), -1.5), teacher_logprobs=torch.full((4, 3), -1.0),
        contrast_logprobs=torch.full((4, 3), -2.0), topk_ids=topk_ids,
        topk_logprobs=torch.full((4, 3, 2), -1.0), rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        rubric_rewards=torch.tensor([0.3, 0.9, 0.5, 0.5]), group_ids=torch.tensor([7, 7, 3, 3]),
    )
    spec = get_loss(name)
    spec.check_inputs(inp.available())
    out = spec.fn(inp, **spec.resolve_args({}))
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_ropd_names_rollouts_without_a_rubric_reward():
    inp = bare_inputs(
        behaviour_logprobs=torch.zeros(1, 3), rubric_rewards=torch.tensor([float("nan")]),
        group_ids=torch.zeros(1, dtype=torch.long),
    )
    spec = get_loss("ropd")
    with pytest.raises(LopdError, match="rubric reward") as err:
        spec.fn(inp, **spec.resolve_args({}))
    assert FIELD_SOURCES["rubric_rewards"] in str(err.value)


def test_tail_bucket_losses_read_the_cached_tail_mass():
    """A peaked teacher's tail rebuilt from float16 top-k log-probs is far off; the scorer's cached tail is not."""
    g = torch.Generator().manual_seed(0)
    V, K = 50, 4
    teacher_logits = torch.randn(1, 3, V, generator=g, dtype=torch.float64)
    teacher_logits[..., :K] += torch.tensor([9.0, 8.0, 7.5, 7.0], dtype=torch.float64)  # ~99.9% of the mass in the top 4
    teacher = teacher_logits.log_softmax(-1)
    exact_top, ids = teacher.topk(K, dim=-1)
    exact_tail = torch.log1p(-exact_top.exp().sum(-1))
    stored_top = exact_top.to(torch.float16).to(torch.float32)  # as the cache stores them
    tokens, mask = ids[..., 0], torch.ones(1, 3)
    logits = torch.randn(1, 3, V, generator=g)

    def inputs(top: torch.Tensor, tail: torch.Tensor | None) -> LossInputs:
        return LossInputs(student=StudentLogprobs.from_logits(logits, tokens, mask, ids), tokens=tokens, mask=mask,
                          topk_ids=ids, topk_logprobs=top, tail_logprob=tail)

    def loss(top: torch.Tensor, tail: torch.Tensor | None) -> float:
        return get_loss("fkl_topk_tail").fn(inputs(top, tail)).loss.item()

    rebuilt = topk_support(inputs(stored_top, None), tail=True)[1][..., -1].double()
    assert ((rebuilt.exp() - exact_tail.exp()).abs() / exact_tail.exp()).max() > 0.05  # the problem
    cached_bucket = topk_support(inputs(stored_top, exact_tail.float()), tail=True)[1][..., -1]
    assert torch.equal(cached_bucket, exact_tail.float())
    truth = loss(exact_top.float(), exact_tail.float())
    assert abs(loss(stored_top, exact_tail.float()) - truth) < abs(loss(stored_top, None) - truth)
