"""How far the student has drifted from the policy that produced the cache, per cache shard and overall.

All quantities come from tensors the trainer already has: the student's log-prob of each cached token
(recomputed every step), the behaviour log-prob recorded at rollout time, and the teacher's cached top-k.
Lightning OPD (arXiv 2604.13010) reports the mean importance weight pi_theta / pi_ref settling near 0.94;
these statistics tell when a cache stops being on-policy enough, which is what triggers a refresh.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lopd.losses.base import LossInputs

SUMS = ("tokens", "weight", "weight_sq", "k3", "out_of_band", "teacher_mass", "overlap", "topk_tokens")


@torch.no_grad()
def token_drift(inputs: LossInputs, band: float) -> dict[str, torch.Tensor]:
    """Per-sequence sums ([B] tensors) of the drift statistics over masked tokens.

    Reads the student's log-probs at temperature 1, and its own top-k ids when the cache has a top-k.
    """
    mask = inputs.mask
    logp = inputs.student.token_logprobs().detach()
    out = {"tokens": mask.sum(-1)}
    if inputs.behaviour_logprobs is not None:
        log_ratio = (logp - inputs.behaviour_logprobs) * mask
        weight = log_ratio.exp()
        out["weight"] = (weight * mask).sum(-1)
        out["weight_sq"] = (weight.square() * mask).sum(-1)
        out["k3"] = (((weight - 1) - log_ratio) * mask).sum(-1)  # Schulman's k3 estimator of KL(behaviour || student)
        out["out_of_band"] = (((weight - 1).abs() > band).float() * mask).sum(-1)
    if inputs.topk_ids is not None:
        ids = inputs.topk_ids.long()
        student_mass = inputs.student.topk_logprobs().detach().exp().sum(-1)  # student mass on the teacher top-k
        out["teacher_mass"] = (student_mass * mask).sum(-1)
        student_top = inputs.student.own_topk  # the student's own top-k ids (StudentRequest.topk_overlap = K)
        overlap = (student_top.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).float().mean(-1)
        out["overlap"] = (overlap * mask).sum(-1)
        out["topk_tokens"] = mask.sum(-1)
    return out


@dataclass
class DriftStats:
    """Running sums of the drift statistics for one group of tokens (a shard, or everything)."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMS, 0.0))

    def add(self, per_sequence: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> None:
        for key, values in per_sequence.items():
            self.sums[key] += float(values.sum() if rows is None else values[rows].sum())

    def summary(self) -> dict[str, float]:
        n = self.sums["tokens"]
        if n == 0:
            return {}
        out = {}
        if self.sums["weight"]:
            mean = self.sums["weight"] / n
            out.update(importance_weight=mean,
                       importance_weight_std=max(self.sums["weight_sq"] / n - mean * mean, 0.0) ** 0.5,
                       kl=self.sums["k3"] / n, weight_out_of_band=self.sums["out_of_band"] / n)
        if self.sums["topk_tokens"]:
            out.update(teacher_mass=self.sums["teacher_mass"] / self.sums["topk_tokens"],
                       topk_overlap=self.sums["overlap"] / self.sums["topk_tokens"])
        return out


class ShardDrift:
    """Drift statistics per cache shard (since that shard was last refreshed) and overall (since the last log)."""

    def __init__(self, rows_per_shard: int):
        self.rows_per_shard = rows_per_shard
        self.shards: dict[int, DriftStats] = {}
        self.overall = DriftStats()

    def add(self, per_sequence: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        self.overall.add(per_sequence)
        shard_ids = rows // self.rows_per_shard
        for shard in shard_ids.unique().tolist():
            self.shards.setdefault(shard, DriftStats()).add(per_sequence, shard_ids == shard)

    def reset(self, shards: list[int]) -> None:
        for shard in shards:
            self.shards.pop(shard, None)


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh cache shards. No threshold set: Lightning OPD (never). every_step: standard online OPD."""

    kl: float | None = None  # refresh a shard when its k3 KL(behaviour || student) exceeds this
    weight_out_of_band: float | None = None  # ... or when this fraction of its tokens has |w - 1| > band
    band: float = 0.2
    check_every: int = 25  # steps between checks
    min_tokens: int = 256  # a shard needs this many tokens seen since its refresh before it can be judged
    every_step: bool = False

    @property
    def enabled(self) -> bool:
        return self.every_step or self.kl is not None or self.weight_out_of_band is not None

    def stale(self, drift: ShardDrift) -> list[int]:
        stale = []
        for shard, stats in sorted(drift.shards.items()):
            if stats.sums["tokens"] < self.min_tokens:
                continue
            summary = stats.summary()
            if (self.kl is not None and summary.get("kl", 0.0) > self.kl) or (
                    self.weight_out_of_band is not None and summary.get("weight_out_of_band", 0.0) > self.weight_out_of_band):
                stale.append(shard)
        return stale
