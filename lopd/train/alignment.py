"""Alignment between the teacher signal and the outcome objective (the 'Unmasking OPD' analysis, arXiv 2605.10889).

Two objectives act on the same student rollout y:

- the teacher signal: a registered distillation loss evaluated on y (default `rkl_topk`, reverse KL over the
  cached teacher top-k; any loss whose needs the cache meets, e.g. `lightning`);
- the outcome objective: GRPO, L_out = -A_GRPO(y) * sum_t m_t log pi_theta(y_t), with A_GRPO the group-normalised
  reward of y among the rollouts of its prompt (`lopd.losses.outcome.group_advantages`, computed over the whole
  group of the rollout set, not over a batch).

`lopd diagnose alignment` measures, on a score set and a student checkpoint,

- per rollout: the cosine between the two gradients in parameter space (every student parameter, flattened);
- per token: the cosine between the two gradients in logit space. Both objectives are sums over positions, so
  the gradient with respect to the logits z_t at position t depends only on token t's term: one backward pass
  of each objective to the (detached) logits gives every per-token gradient at once. For the outcome objective
  it is closed-form, -A m_t (e_{y_t} - p_t), so only the signal's gradient is materialised.

separately on failed (A_GRPO < 0: reward below its group's mean) and successful (A_GRPO > 0) rollouts. A rollout
whose group got equal rewards has A_GRPO = 0 and no outcome gradient, so no alignment: it is counted, not sampled.

Note: for a sampled-token signal (`lightning`, L = -D_t log pi_theta(y_t) with D_t detached) the per-token
logit-space gradient is -D_t (e_{y_t} - p_t), parallel to the outcome one, so its per-token cosine is exactly
sign(D_t) * sign(A): the analysis says on which tokens the teacher's advantage and the outcome agree in sign.
A top-k signal (`rkl_topk`) moves the whole distribution, so its per-token cosine is a genuine angle.

The token filter (`lopd train --token-filter aligned`, `apply_token_filter`) uses the same per-token cosine,
with the training loss itself as the teacher signal (or `--token-filter-signal NAME`), to train only on tokens
whose teacher gradient agrees with the outcome gradient.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lopd.errors import LopdError
from lopd.losses.base import LossInputs, LossSpec, upcast
from lopd.losses.student import StudentLogprobs
from lopd.losses.outcome import group_advantages
from lopd.rollout_set import RolloutSet

TOKEN_FILTERS = ("none", "aligned")
NORM_FLOOR = 1e-20
"""A gradient with a smaller norm counts as zero: its cosine is undefined (NaN)."""

SignalFn = Callable[[LossInputs], torch.Tensor]


# -- outcome side


def row_advantages(rollouts: RolloutSet) -> np.ndarray:
    """A_GRPO of every row of a rollout set, over the full group of its prompt: [N] float64.

    Raises a one-line LopdError when the set has no rewards or only one rollout per prompt.
    """
    rewards = np.asarray(rollouts.rewards, dtype=np.float64)
    if len(rewards) == 0:
        raise LopdError(f"rollout set {rollouts.id} holds no rollouts")
    if np.isnan(rewards).any():
        raise LopdError(f"rollout set {rollouts.id} has no rewards, so there is no outcome objective to align with; "
                        "roll out with `lopd rollout --verifier module:function`")
    group_ids = torch.from_numpy(np.array(rollouts.group_ids, dtype=np.int64))
    _, group = torch.unique(group_ids, return_inverse=True)
    if int(torch.bincount(group).max()) < 2:
        raise LopdError(f"rollout set {rollouts.id} has one rollout per prompt, so every GRPO advantage is 0; "
                        "roll out several samples per prompt with `lopd rollout --n N` (N > 1)")
    return group_advantages(torch.from_numpy(rewards), group_ids).numpy()


def outcome_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """GRPO's outcome objective: -sum_b A_b sum_t m_bt log pi(y_bt). [B, T, V], [B, T], [B, T], [B] -> scalar."""
    logp = torch.log_softmax(upcast(logits), -1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return -(advantages.to(logp.dtype).unsqueeze(-1) * logp * mask.to(logp.dtype)).sum()


# -- per-token (logit-space) alignment


def signal_of(spec: LossSpec, args: dict[str, Any]) -> SignalFn:
    """A registered loss with resolved arguments, as a function of LossInputs returning the scalar loss."""
    return lambda inputs: spec.fn(inputs, **args).loss


def logit_gradient(signal: SignalFn, inputs: LossInputs) -> torch.Tensor:
    """d signal / d logits at every position, with the logits detached from the model: [B, T, V].

    `inputs` must come from full logits (StudentLogprobs.from_logits): this diagnostic needs every logit.
    """
    z = upcast(inputs.student.logits.detach()).requires_grad_(True)
    with torch.enable_grad():
        student = StudentLogprobs.from_logits(z, inputs.tokens, inputs.mask, inputs.topk_ids, inputs.student.request)
        loss = signal(replace(inputs, student=student))
        if not loss.requires_grad:
            return torch.zeros_like(z)
        (grad,) = torch.autograd.grad(loss, z, allow_unused=True)
    return torch.zeros_like(z) if grad is None else grad.detach()


def token_alignment(inputs: LossInputs, advantages: torch.Tensor, signal: SignalFn) -> torch.Tensor:
    """Per-token cosine between the logit-space gradients of the teacher signal and of the outcome objective: [B, T].

    The outcome gradient at position t is -A_b m_bt (e_{y_bt} - p_bt) (p = softmax of the logits), so
    <g_sig, g_out> = -A m (g_sig[y] - <g_sig, p>) and |g_out| = |A| m sqrt(1 - 2 p_y + |p|^2).
    NaN where either gradient is (numerically) zero: masked positions, A = 0, or a position the signal ignores.
    """
    g_sig = logit_gradient(signal, inputs)
    with torch.no_grad():
        probs = torch.softmax(inputs.student.logits.detach().to(g_sig.dtype), dim=-1)
        tokens = inputs.tokens.long().unsqueeze(-1)
        scale = -advantages.to(g_sig.dtype).unsqueeze(-1) * inputs.mask.to(g_sig.dtype)  # [B, T]
        p_y = probs.gather(-1, tokens).squeeze(-1)
        dot = scale * (g_sig.gather(-1, tokens).squeeze(-1) - (g_sig * probs).sum(-1))
        out_norm = scale.abs() * (1.0 - 2.0 * p_y + probs.pow(2).sum(-1)).clamp_min(0.0).sqrt()
        sig_norm = g_sig.norm(dim=-1)
        defined = (out_norm > NORM_FLOOR) & (sig_norm > NORM_FLOOR) & (inputs.mask > 0)
        cos = dot / (out_norm * sig_norm).clamp_min(NORM_FLOOR)
        return torch.where(defined, cos.clamp(-1.0, 1.0), torch.full_like(cos, float("nan")))


def aligned_mask(cos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask restricted to positively aligned tokens (cos > 0); tokens whose alignment is undefined (NaN: no
    outcome gradient because A = 0, or no signal gradient) are kept, since nothing says they disagree."""
    keep = (cos > 0) | torch.isnan(cos)
    return mask * keep.to(mask.dtype)


# -- the training-time filter


@dataclass
class AlignedTokenFilter:
    """`TrainConfig.token_filter = "aligned"`: multiplies each micro-batch's loss mask by (cos > 0), cos being the
    per-token alignment between the teacher signal's and the outcome's logit-space gradients (detached; no
    gradient flows through the choice). A_GRPO comes from the whole rollout set (`row_advantages`), so groups
    split across micro-batches still get their true advantage. The per-token gradients need the full logits, so
    the trainer hands this filter inputs built from detached [B, T, V] logits: unlike the losses, the filter
    materialises them (no grad), which limits it to modest vocabularies x lengths."""

    advantages: np.ndarray  # A_GRPO per dataset row
    signal: SignalFn

    def __call__(self, inputs: LossInputs, rows: torch.Tensor | None) -> tuple[LossInputs, dict[str, float]]:
        if rows is None:
            raise LopdError("--token-filter aligned needs batches from a rollout or score set (rows with rewards), "
                            "not live-sampled batches")
        advantages = torch.as_tensor(self.advantages[rows.cpu().numpy()], device=inputs.mask.device)
        cos = token_alignment(inputs, advantages, self.signal)
        keep = aligned_mask(cos, inputs.mask)
        total = inputs.mask.sum().clamp_min(1.0)
        defined = (~torch.isnan(cos)).to(inputs.mask.dtype) * inputs.mask
        metrics = {"filter_kept": (keep.sum() / total).item(),
                   "filter_defined": (defined.sum() / total).item()}
        return replace(inputs, mask=keep), metrics


def check_token_filter(name: str, source, refresh: bool = False, signal: str = "") -> None:
    """Raise a one-line LopdError if the token filter `name` cannot run on `source` (before any training starts)."""
    if name not in TOKEN_FILTERS:
        raise LopdError(f"unknown token filter {name!r}; choose one of: {', '.join(TOKEN_FILTERS)}")
    if name == "none":
        if signal:
            raise LopdError("--token-filter-signal only applies with --token-filter aligned")
        return
    if signal:
        from lopd.losses import get_loss
        from lopd.train.data import available_fields

        get_loss(signal).check_inputs(available_fields(source))
    if source is None:
        raise LopdError("--token-filter aligned needs a cache or rollout set with rewards; it does not apply to "
                        "live-sampled (online) batches")
    if refresh:
        raise LopdError("--token-filter aligned cannot be combined with cache refresh yet (refreshed rows carry "
                        "new rewards)")
    row_advantages(_rollouts_of(source))


def build_token_filter(name: str, source, spec: LossSpec, loss_args: dict[str, Any],
                       signal: str = "") -> AlignedTokenFilter | None:
    """The filter a TrainConfig names: None for "none"; the signal is the training loss unless `signal` names one."""
    if name == "none":
        return None
    if signal:
        from lopd.losses import get_loss

        spec, loss_args = get_loss(signal), get_loss(signal).resolve_args({})
    return AlignedTokenFilter(row_advantages(_rollouts_of(source)), signal_of(spec, loss_args))


def _rollouts_of(source) -> RolloutSet:
    return source if isinstance(source, RolloutSet) else source.rollouts


# -- the diagnostic


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flat vectors; NaN if either is (numerically) zero."""
    na, nb = a.norm(), b.norm()
    if na <= NORM_FLOOR or nb <= NORM_FLOOR:
        return float("nan")
    return float((a @ b / (na * nb)).clamp(-1.0, 1.0))


def summarize(values) -> dict[str, Any]:
    """count, mean, median, 10th/90th percentiles and the fraction > 0 of the finite values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"count": 0, "mean": None, "median": None, "p10": None, "p90": None, "fraction_positive": None}
    return {"count": int(x.size), "mean": round(float(x.mean()), 4), "median": round(float(np.median(x)), 4),
            "p10": round(float(np.percentile(x, 10)), 4), "p90": round(float(np.percentile(x, 90)), 4),
            "fraction_positive": round(float((x > 0).mean()), 4)}


def pick_rows(advantages: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """Up to `rows` rows with a non-zero outcome gradient, sampled without replacement by `seed`, in row order."""
    candidates = np.flatnonzero(advantages != 0)
    if len(candidates) <= rows:
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, size=rows, replace=False))


def default_out_dir(root: Path, cache_id: str, student_fingerprint: str, signal: str) -> Path:
    return root / "diagnostics" / f"alignment-{cache_id}-{student_fingerprint[:10]}-{signal}"


def diagnose_alignment(student: str, cache, *, signal: str = "rkl_topk", signal_args: dict[str, Any] | None = None,
                       rows: int = 256, seed: int = 0, out: Path | None = None, root: Path | None = None,
                       quiet: bool = False) -> dict[str, Any]:
    """Measure teacher-signal / outcome gradient alignment on `rows` rollouts of `cache` under `student`.

    Writes alignment.json, alignment.md and alignment.png to `out` (default <root>/diagnostics/...) and returns
    the report (without the per-row records), with `out` set to the directory written.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.fingerprint import model_fingerprint
    from lopd.losses import get_loss
    from lopd.models.guards import check_training_inputs
    from lopd.models.loading import resolve_model
    from lopd.storage import resolve_root
    from lopd.train.data import SequenceDataset, available_fields, collate

    if rows < 1:
        raise LopdError(f"--rows must be at least 1, got {rows}")
    start = time.perf_counter()
    student = resolve_model(student)
    spec = get_loss(signal)
    args = spec.resolve_args(signal_args or {})
    spec.check_inputs(available_fields(cache))
    check_training_inputs(student, cache, allow_lineage_mismatch=True)  # the vocabulary must match; lineage need not
    advantages = row_advantages(cache.rollouts)
    chosen = pick_rows(advantages, rows, seed)
    if len(chosen) == 0:
        raise LopdError(f"every prompt of rollout set {cache.rollouts.id} got equal rewards on all its rollouts, so the "
                        "GRPO outcome gradient is zero everywhere; roll out more samples per prompt (--n) or harder prompts")
    fingerprint = model_fingerprint(student)
    out = Path(out) if out else default_out_dir(resolve_root(root), cache.id, fingerprint, signal)

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(student)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    signal_fn = signal_of(spec, args)
    dataset = SequenceDataset(cache)
    records: list[dict[str, Any]] = []
    token_cos: dict[str, list[np.ndarray]] = {"failed": [], "successful": []}
    for row in tqdm(chosen.tolist(), desc="alignment", unit="rollout", disable=quiet):
        batch = collate([dataset[row]], pad_id=pad_id)
        advantage = torch.tensor([advantages[row]], dtype=torch.float32)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        inputs = batch.loss_inputs_from_logits(logits, spec.student_request(args))
        grads = []
        for loss in (signal_fn(inputs), outcome_loss(inputs.student.logits, inputs.tokens, inputs.mask, advantage)):
            parts = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                    for g, p in zip(parts, params)]))
        cos_tokens = token_alignment(inputs, advantage, signal_fn)[0][inputs.mask[0] > 0].numpy()
        split = "failed" if advantages[row] < 0 else "successful"
        token_cos[split].append(cos_tokens)
        finite = cos_tokens[np.isfinite(cos_tokens)]
        records.append({"row": int(row), "group_id": int(cache.rollouts.group_ids[row]),
                        "reward": float(cache.rollouts.rewards[row]), "advantage": round(float(advantages[row]), 6),
                        "split": split, "cosine": round(cosine(grads[0], grads[1]), 6), "tokens": int(len(cos_tokens)),
                        "token_fraction_positive": round(float((finite > 0).mean()), 4) if finite.size else None})
        del logits, inputs, grads

    per_rollout = {s: summarize([r["cosine"] for r in records if r["split"] == s]) for s in ("failed", "successful")}
    per_rollout["all"] = summarize([r["cosine"] for r in records])
    flat = {s: np.concatenate(v) if v else np.zeros(0) for s, v in token_cos.items()}
    per_token = {s: summarize(flat[s]) for s in ("failed", "successful")}
    per_token["all"] = summarize(np.concatenate([flat["failed"], flat["successful"]]))
    report = {
        "kind": "alignment", "paper": "arXiv 2605.10889",
        "cache": cache.id, "rollout_set": cache.rollouts.id, "student": student, "student_fingerprint": fingerprint,
        "signal": signal, "signal_args": args,
        "outcome": "GRPO: -A_GRPO(y) * sum_t log pi(y_t), A_GRPO over the rollout set's groups",
        "rows_total": len(cache), "rows_zero_advantage": int((advantages == 0).sum()), "rows_sampled": len(records),
        "seed": seed, "per_rollout": per_rollout, "per_token": per_token,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_report(out, report, records, flat)
    return dict(report, out=str(out))


# -- the report


def write_report(out: Path, report: dict[str, Any], records: list[dict[str, Any]], tokens: dict[str, np.ndarray]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.json").write_text(json.dumps(dict(report, rollouts=records), indent=1) + "\n")
    (out / "alignment.md").write_text(markdown(report))
    plot(out / "alignment.png", records, tokens, report)


def markdown(report: dict[str, Any]) -> str:
    def cell(stats: dict[str, Any], key: str) -> str:
        return "-" if stats[key] is None else f"{stats[key]:.3f}"

    lines = [
        "# Teacher-signal / outcome gradient alignment (arXiv 2605.10889)",
        "",
        f"cache {report['cache']} (rollouts {report['rollout_set']}), student {report['student']} "
        f"({report['student_fingerprint'][:10]}), teacher signal `{report['signal']}`, outcome {report['outcome']}.",
        f"{report['rows_sampled']} rollouts sampled of the {report['rows_total'] - report['rows_zero_advantage']} with a "
        f"non-zero advantage ({report['rows_zero_advantage']} of {report['rows_total']} have A_GRPO = 0: equal rewards "
        "in their group). Failed: reward below its group's mean; successful: above.",
        "",
        "| rollouts | n | rollout cos mean | median | frac > 0 | tokens | token cos mean | median | frac > 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split in ("failed", "successful", "all"):
        r, t = report["per_rollout"][split], report["per_token"][split]
        lines.append(f"| {split} | {r['count']} | {cell(r, 'mean')} | {cell(r, 'median')} | {cell(r, 'fraction_positive')} "
                     f"| {t['count']} | {cell(t, 'mean')} | {cell(t, 'median')} | {cell(t, 'fraction_positive')} |")
    lines += ["", "Rollout cos: parameter-space cosine between the gradients of the two objectives on one rollout. "
              "Token cos: logit-space cosine at each token (for a sampled-token signal such as `lightning` it is "
              "exactly +1 or -1: the sign agreement of the teacher advantage and A_GRPO).", ""]
    return "\n".join(lines)


def plot(path: Path, records: list[dict[str, Any]], tokens: dict[str, np.ndarray], report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.linspace(-1.0, 1.0, 41)
    colors = {"failed": "tab:red", "successful": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, color in colors.items():
        rollout = np.array([r["cosine"] for r in records if r["split"] == split], dtype=np.float64)
        rollout = rollout[np.isfinite(rollout)]
        token = tokens[split][np.isfinite(tokens[split])]
        if rollout.size:
            axes[0].hist(rollout, bins=bins, alpha=0.55, color=color, label=f"{split} ({rollout.size})")
        if token.size:
            axes[1].hist(token, bins=bins, alpha=0.55, color=color, density=True, label=f"{split} ({token.size})")
    axes[0].set_title("per rollout (parameter space)")
    axes[0].set_ylabel("rollouts")
    axes[1].set_title("per token (logit space)")
    axes[1].set_ylabel("density")
    for ax in axes:
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_xlabel("cos(grad teacher signal, grad outcome)")
        ax.set_xlim(-1.05, 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['signal']} vs GRPO outcome on {report['cache']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
