"""Drift statistics, the refresh trigger, and a refresh that regenerates only the stale shard."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from lopd.cache import open_cache
from lopd.losses.base import LossInputs
from lopd.losses.student import StudentLogprobs, StudentRequest
from lopd.rollout import SamplingConfig, rollout
from lopd.rollout_set import write_rollout_set
from lopd.score import ScoreConfig, score
from lopd.toy import TEACHER_DIR, words
from lopd.train.drift import DriftStats, RefreshPolicy, ShardDrift, token_drift
from lopd.train.refresh import RefreshContext
from lopd.train.trainer import TrainConfig, train

TEACHER = str(TEACHER_DIR)


def synthetic_drift(kl_per_token: float, tokens: int) -> dict[str, torch.Tensor]:
    """Per-sequence sums for one sequence whose tokens all carry the given k3 value."""
    return {"tokens": torch.tensor([float(tokens)]), "weight": torch.tensor([float(tokens)]),
            "weight_sq": torch.tensor([float(tokens)]), "k3": torch.tensor([kl_per_token * tokens]),
            "out_of_band": torch.tensor([0.0])}


def test_refresh_triggers_only_when_drift_crosses_threshold():
    drift = ShardDrift(rows_per_shard=10)
    drift.add(synthetic_drift(0.01, 500), torch.tensor([3]))  # shard 0: below
    drift.add(synthetic_drift(0.30, 500), torch.tensor([15]))  # shard 1: above
    drift.add(synthetic_drift(0.30, 10), torch.tensor([25]))  # shard 2: above, but too few tokens to judge
    policy = RefreshPolicy(kl=0.1, min_tokens=100)
    assert policy.stale(drift) == [1]
    assert RefreshPolicy(kl=0.5).stale(drift) == []
    assert RefreshPolicy().stale(drift) == [] and not RefreshPolicy().enabled
    drift.reset([1])
    assert policy.stale(drift) == []


def test_token_drift_is_zero_on_policy():
    logits = torch.randn(2, 3, 8)
    tokens = torch.randint(0, 8, (2, 3))
    behaviour = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    topk = torch.log_softmax(logits, -1).topk(4, -1)
    student = StudentLogprobs.from_logits(logits, tokens, torch.ones(2, 3), topk.indices, StudentRequest(topk_overlap=4))
    inputs = LossInputs(student=student, tokens=tokens, mask=torch.ones(2, 3), behaviour_logprobs=behaviour,
                        topk_ids=topk.indices, topk_logprobs=topk.values)
    stats = DriftStats()
    stats.add(token_drift(inputs, band=0.2))
    summary = stats.summary()
    assert summary["importance_weight"] == pytest.approx(1.0, abs=1e-5)
    assert summary["kl"] == pytest.approx(0.0, abs=1e-6)
    assert summary["weight_out_of_band"] == 0.0 and summary["topk_overlap"] == pytest.approx(1.0)


@pytest.mark.slow
def test_only_the_stale_shard_is_regenerated(pool, root, tmp_path):
    """Shard 1's behaviour log-probs are shifted (synthetic drift); one step later only shard 1 is re-rolled."""
    prompts = [asdict(p) for p in words.make_prompts("test", 48)]
    clean, _ = rollout(TEACHER, prompts, SamplingConfig(n=1, max_tokens=10, seed=3), root=root, llm=pool.get(TEACHER),
                       quiet=True)
    records = clean.rows()
    for r in records[16:32]:
        r["behaviour_logprobs"] = [lp - 1.0 for lp in r["behaviour_logprobs"]]
    drifted = write_rollout_set(root / "rollouts" / "r-drifted", records, dict(clean.meta, id="r-drifted"))
    scored = score(TEACHER, drifted, ScoreConfig(k=8, rows_per_shard=16), root=root, llm=pool.get(TEACHER), quiet=True)
    cache = open_cache(scored.path)
    config = TrainConfig(loss="rkl_topk", lr=1e-9, batch_size=48, steps=2, seed=0,
                         refresh={"kl": 0.1, "check_every": 1, "min_tokens": 1})
    result = train(TEACHER, cache, config, tmp_path / "ckpt", quiet=True, root=root,
                   refresh_context=RefreshContext(TEACHER, pool, root, "refresh-test"))
    generations = json.loads((tmp_path / "ckpt" / "refresh" / "generations.json").read_text())
    assert [g["shards"] for g in generations] == [[1]] and generations[0]["rows"] == 16
    assert result.refresh["refreshes"] == 1 and result.refresh["rows_refreshed"] == 16
    fresh = open_cache(root / "scores" / generations[0]["score_set"])
    assert len(fresh) == 16 and fresh.rollouts.meta["model_fingerprint"] != clean.meta["model_fingerprint"]


@pytest.mark.slow
def test_every_step_refresh_resamples_each_steps_rows_as_they_are_read(pool, root, tmp_path):
    """Standard online OPD (`every_step`): the rows of each step are re-sampled at that step, before training on
    them; the refresh's seconds are timed apart from reading the data."""
    prompts = [asdict(p) for p in words.make_prompts("test", 16)]
    clean, _ = rollout(TEACHER, prompts, SamplingConfig(n=1, max_tokens=10, seed=3), root=root, llm=pool.get(TEACHER),
                       quiet=True)
    scored = score(TEACHER, clean, ScoreConfig(k=8, rows_per_shard=16), root=root, llm=pool.get(TEACHER), quiet=True)
    config = TrainConfig(loss="rkl_topk", lr=1e-9, batch_size=8, steps=2, seed=0, log_every=1,
                         refresh={"every_step": True})
    train(TEACHER, open_cache(scored.path), config, tmp_path / "ckpt", quiet=True, root=root,
          refresh_context=RefreshContext(TEACHER, pool, root, "every-step-test"))
    generations = json.loads((tmp_path / "ckpt" / "refresh" / "generations.json").read_text())
    assert [(g["step"], g["rows"]) for g in generations] == [(1, 8), (2, 8)]
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["refreshes"] for r in rows] == [1, 2] and all(r["time/refresh"] > 0 for r in rows)
