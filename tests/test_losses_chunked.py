"""The chunked student head equals the unchunked path, for every registered loss.

The trainer never builds [B, T, V] logits: hidden states go through lm_head a few positions at a time
(lopd.losses.student) and backward recomputes each chunk. Here every loss is computed both ways from the
same float32 hidden states and lm_head, with a chunk size that splits sequences and skips masked
positions; loss values and gradients w.r.t. the hidden states and lm_head must agree within 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from lopd.losses import REGISTRY, LossInputs, get_loss
from lopd.losses.student import StudentLogprobs, StudentRequest, student_logprobs

B, T, H, V, K = 4, 7, 16, 50, 5
CHUNK = 3  # 28 positions (some masked): chunks straddle row boundaries
GROUP_IDS = [0, 0, 1, 1]


def fields(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Every optional loss input, random but plausible (log-probs <= 0, rewards in [0, 1], two groups)."""
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, :2] = 0.0  # a prompt-like prefix
    mask[2, 5:] = 0.0  # padding
    teacher = torch.randn(B, T, V, generator=g).log_softmax(-1)
    topk_logprobs, topk_ids = teacher.topk(K, dim=-1)
    def logps() -> torch.Tensor:
        return -torch.rand(B, T, generator=g) * 3
    return dict(
        tokens=tokens, mask=mask, behaviour_logprobs=logps(), teacher_logprobs=teacher.gather(-1, tokens[..., None])[..., 0],
        topk_ids=topk_ids, topk_logprobs=topk_logprobs, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        group_ids=torch.tensor(GROUP_IDS), base_logprobs=logps(), contrast_logprobs=logps(),
        rubric_rewards=torch.rand(B, generator=g),
    )


def loss_and_grads(name: str, chunk_size: int | None, seed: int, overrides: dict | None = None,
                   wrapped: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wrapped: lm_head inside another module, as under ZeRO-3 or an adapter: the activation-checkpointing path."""
    g = torch.Generator().manual_seed(seed)
    data = fields(g)
    hidden = (torch.randn(B, T, H, generator=g) * 2).requires_grad_(True)
    linear = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
    head = torch.nn.Sequential(linear) if wrapped else linear
    head.out_features = V
    spec = get_loss(name)
    args = spec.resolve_args(overrides or {})
    request = spec.student_request(args)
    if chunk_size is None:
        student = StudentLogprobs.from_logits(head(hidden), data["tokens"], data["mask"], data["topk_ids"], request)
    else:
        student = student_logprobs(hidden, head, data["tokens"], data["mask"], data["topk_ids"], request, chunk_size)
    out = spec.fn(LossInputs(student=student, **data), **args)
    grad_hidden, grad_head = torch.autograd.grad(out.loss, [hidden, linear.weight], allow_unused=True)
    zero = torch.zeros(())
    return out.loss.detach(), (zero if grad_hidden is None else grad_hidden), (zero if grad_head is None else grad_head)


# Loss arguments that change what the student pass computes: a temperature, the student's entropy.
STUDENT_VARIANTS = [("gkd", {"temperature": 2.0}), ("rkl_topk", {"entropy_top_ratio": 0.5}), ("tip", {})]


@pytest.mark.parametrize("name,overrides", [(name, {}) for name in sorted(REGISTRY)] + STUDENT_VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "wrapped-head"])
def test_chunked_equals_unchunked(name: str, overrides: dict, seed: int, wrapped: bool):
    loss, grad_hidden, grad_head = loss_and_grads(name, None, seed, overrides)
    chunked, chunked_hidden, chunked_head = loss_and_grads(name, CHUNK, seed, overrides, wrapped)
    assert torch.isfinite(loss)
    torch.testing.assert_close(chunked, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_hidden, grad_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_head, grad_head, rtol=1e-5, atol=1e-5)


def test_extras_match_the_full_distribution():
    """Entropy, tempered top-k log-probs and the student's own top-k ids, chunked, against torch on full logits."""
    g = torch.Generator().manual_seed(3)
    data = fields(g)
    hidden, head = torch.randn(B, T, H, generator=g), torch.nn.Linear(H, V, bias=False)
    request = StudentRequest(temperature=0.7, entropy=True, topk_overlap=K)
    got = student_logprobs(hidden, head, data["tokens"], data["mask"], data["topk_ids"], request, CHUNK)
    full = (head(hidden) / 0.7).log_softmax(-1).detach()
    keep = data["mask"] > 0
    torch.testing.assert_close(got.topk_logprobs(0.7)[keep], full.gather(-1, data["topk_ids"])[keep])
    torch.testing.assert_close(got.entropies()[keep], -(full.exp() * full).sum(-1)[keep])
    assert torch.equal(got.own_topk[keep], full.topk(K, dim=-1).indices[keep])
    assert (got.token_logprobs()[~keep] == 0).all()


def test_a_loss_reading_an_undeclared_temperature_is_refused():
    g = torch.Generator().manual_seed(0)
    data = fields(g)
    student = StudentLogprobs.from_logits(torch.randn(B, T, V, generator=g), data["tokens"], data["mask"], data["topk_ids"])
    with pytest.raises(Exception, match="declared 1.0"):
        student.topk_logprobs(2.0)
