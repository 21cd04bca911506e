"""The student's side of every loss: log-probs at the few token ids a loss reads, never a [B, T, V] tensor.

Every registered loss touches the student's distribution only through log pi_theta at the sampled token,
at the teacher's cached top-k ids (at one temperature), and, without grad, its entropy. So the trainer
never needs the full logits of a micro-batch: `student_logprobs` runs `lm_head` over the hidden states a
chunk of positions at a time, keeps only those gathered values, and recomputes each chunk in backward
(non-reentrant activation checkpointing) instead of keeping its [chunk, V] activations. At vocabulary
151,936 one float32 [T, V] tensor is 2.3 GiB at T = 4k; the chunked path holds a few [chunk, V] at once.
This is Liger-Kernel's chunked-loss idea over a top-k cache: the memory trick lives here, once, and
each loss stays its paper's formula over [B, T] / [B, T, K] tensors (lopd.losses.*).

Losses coupled across the batch (batch-mean baselines, top-fraction token selection, group-normalised
advantages) need no second mechanism: they see the whole micro-batch's gathered log-probs at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from lopd.errors import LopdError

@dataclass(frozen=True)
class StudentRequest:
    """What a loss reads from the student, so one chunked pass computes all of it.

    temperature divides the logits before every log-softmax below; entropy asks for the (tempered)
    full-vocabulary entropy per position, without grad; topk_overlap > 0 asks for the student's own top-k
    ids (no grad), which the drift statistics compare with the teacher's.
    """

    temperature: float = 1.0
    entropy: bool = False
    topk_overlap: int = 0


class StudentLogprobs(NamedTuple):
    """The student's log-probs at response positions ([B, T] / [B, T, K]); 0 where the mask is 0.

    Built by `student_logprobs` (chunked, from hidden states) or `StudentLogprobs.from_logits` (the
    unchunked reference path, which keeps `logits` so tests and diagnostics can differentiate w.r.t. them).
    A tuple, so that a model forward returning it exposes its tensors to DeepSpeed's output hooks.
    """

    token: torch.Tensor  # log pi_theta(y_t), with grad
    topk: torch.Tensor | None  # log pi_theta at the teacher's top-k ids, with grad; None without a top-k cache
    entropy: torch.Tensor | None  # H(pi_theta) per position, no grad; None unless requested
    own_topk: torch.Tensor | None  # the student's own top-k ids, no grad; None unless requested
    vocab_size: int
    request: StudentRequest
    logits: torch.Tensor | None = None  # only on the unchunked path

    def token_logprobs(self) -> torch.Tensor:
        """log pi_theta(y_t) at the request's temperature: [B, T]."""
        return self.token

    def topk_logprobs(self, temperature: float = 1.0) -> torch.Tensor:
        """Full-vocabulary log pi_theta(v / temperature) at the teacher's top-k ids v: [B, T, K]."""
        self._check(temperature)
        if self.topk is None:
            raise LopdError("the student's top-k log-probs need a teacher top-k cache (`lopd score --k K`)")
        return self.topk

    def entropies(self) -> torch.Tensor:
        """Full-vocabulary entropy of the student per position, without grad: [B, T]."""
        if self.entropy is None:
            raise LopdError("a loss read the student's entropy without declaring it (register_loss(..., student=...))")
        return self.entropy

    def _check(self, temperature: float) -> None:
        if temperature != self.request.temperature:
            raise LopdError(f"a loss read student log-probs at temperature {temperature} but declared "
                            f"{self.request.temperature} (register_loss(..., student=...))")

    @classmethod
    def from_logits(cls, logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    topk_ids: torch.Tensor | None = None, request: StudentRequest = StudentRequest()) -> "StudentLogprobs":
        """The unchunked path: the same quantities from full response-aligned logits [B, T, V]."""
        out = student_logprobs(logits, torch.nn.Identity(), tokens, mask, topk_ids, request, chunk_size=None)
        return out._replace(logits=logits)


def student_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    mask: torch.Tensor,
    topk_ids: torch.Tensor | None,
    request: StudentRequest,
    chunk_size: int | None,
) -> StudentLogprobs:
    """Gather the student's log-probs at `tokens` and `topk_ids` from `head(hidden)`, a chunk of positions at a time.

    hidden: [B, T, H] response-aligned hidden states (or [B, T, V] logits with an identity head); positions
    where `mask` is 0 are skipped. chunk_size None: one chunk, no recomputation (the reference path).
    Each chunk's [n, V] logits live only inside `_chunk`; in backward the chunk is recomputed.
    """
    if chunk_size is not None and chunk_size < 1:
        raise LopdError(f"the loss chunk size must be >= 1 position, got {chunk_size}")
    ids = tokens.long().unsqueeze(-1)
    if topk_ids is not None:
        ids = torch.cat([ids, topk_ids.long()], dim=-1)
    valid = mask > 0
    flat_hidden, flat_ids = hidden[valid], ids[valid]
    n = flat_hidden.shape[0]
    step = chunk_size or max(n, 1)
    if chunk_size is not None and _plain_linear(head):
        pieces = [_ChunkedLinearGather.apply(flat_hidden, head.weight, head.bias, flat_ids, step, request)] if n else []
    else:
        recompute = chunk_size is not None and torch.is_grad_enabled() and hidden.requires_grad
        pieces = []
        for start in range(0, n, step):
            args = (flat_hidden[start:start + step], flat_ids[start:start + step], head, request)
            pieces.append(checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args))
    width = ids.shape[-1] + int(request.entropy) + request.topk_overlap
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    gathered = hidden.new_zeros(valid.shape + (width,), dtype=dtype)
    if pieces:
        gathered = gathered.index_put((valid,), torch.cat(pieces))
    vocab = hidden.shape[-1] if isinstance(head, torch.nn.Identity) else int(head.out_features)
    k = ids.shape[-1]
    entropy = gathered[..., k].detach() if request.entropy else None
    own = gathered[..., k + int(request.entropy):].detach().long() if request.topk_overlap else None
    return StudentLogprobs(token=gathered[..., 0], topk=gathered[..., 1:k] if topk_ids is not None else None,
                           entropy=entropy, own_topk=own, vocab_size=vocab, request=request)


def _chunk(hidden: torch.Tensor, ids: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
           request: StudentRequest) -> torch.Tensor:
    """One chunk: [n, H] -> [n, J (+1 entropy) (+k own top-k ids)] in at least float32.

    The no-grad extras come after the gathered log-probs, so checkpoint's early stop skips them when it
    recomputes the chunk in backward.
    """
    logits = head(hidden)
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if request.temperature != 1.0:
        logits = logits / request.temperature
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = [logits.gather(-1, ids) - logz]
    with torch.no_grad():
        if request.entropy:
            probs = torch.softmax(logits, dim=-1)
            out.append(logz - (probs * logits).sum(-1, keepdim=True))
        if request.topk_overlap:
            out.append(logits.topk(request.topk_overlap, dim=-1).indices.to(logits.dtype))
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]



def _plain_linear(head) -> bool:
    """A head whose weight we may use directly: a bare nn.Linear, not partitioned by ZeRO-3 (whose module hooks must
    gather it: such heads, and adapted ones, take the activation-checkpointing path instead)."""
    return type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id")


class _ChunkedLinearGather(torch.autograd.Function):
    """[N, H] hidden states -> log-softmax(hidden @ W.T + b) gathered at `ids` [N, J] (+ no-grad extras), chunk by chunk.

    Forward keeps only each position's log-normaliser; backward recomputes a chunk's logits into one [n, V] buffer
    and turns it, in place, into d loss / d logits = scatter(g) - (sum_j g_j) softmax (divided by the temperature),
    then into the gradients of the hidden states and of W. One float32 [chunk, V] buffer is live at a time, where
    autograd over the same maths keeps four to five (logits, exp, softmax grad, scatter grad).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, chunk_size: int, request: StudentRequest):
        outputs, logzs = [], []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk_size):
                z = _logits(hidden[start:start + chunk_size], weight, bias, request.temperature)
                picked = z.gather(-1, ids[start:start + chunk_size])
                top = z.topk(request.topk_overlap, dim=-1).indices.to(z.dtype) if request.topk_overlap else None
                peak = z.amax(-1, keepdim=True)
                probs = z.sub_(peak).exp_()  # in place: z is no longer needed
                total = probs.sum(-1, keepdim=True)
                logz = peak + total.log()
                out = [picked - logz]
                if request.entropy:
                    probs.div_(total)
                    out.append(-torch.special.xlogy(probs, probs).sum(-1, keepdim=True))
                if top is not None:
                    out.append(top)
                outputs.append(torch.cat(out, dim=-1))
                logzs.append(logz)
        ctx.save_for_backward(hidden, weight, bias, ids, torch.cat(logzs))
        ctx.chunk_size, ctx.temperature = chunk_size, request.temperature
        return torch.cat(outputs)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, ids, logz = ctx.saved_tensors
        grad = grad_out[:, :ids.shape[-1]].float()  # the extras carry no gradient
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate W's gradient over chunks in >= float32
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                     if bias is not None and ctx.needs_input_grad[2] else None)
        step = ctx.chunk_size
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            g = grad[rows]
            dz = _logits(hidden[rows], weight, bias, ctx.temperature)
            dz.sub_(logz[rows]).exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids[rows], g)
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            if grad_hidden is not None:
                grad_hidden[rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(dz.T.to(acc), hidden[rows].to(acc))
            if grad_bias is not None:
                grad_bias.add_(dz.sum(0).to(acc))
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """hidden @ W.T (+ b) in at least float32, divided by the temperature: a fresh [n, V] buffer to work in place on."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
    return z.div_(temperature) if temperature != 1.0 else z
