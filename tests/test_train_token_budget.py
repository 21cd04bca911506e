"""Token-budget micro-batches (`--max-tokens-per-micro-batch`): rows grouped by length, the step's gradient unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lopd.cache import open_cache
from lopd.train.config import TrainConfig
from lopd.train.sampling import split_by_tokens
from lopd.train.trainer import train
from toy_sets import STUDENT, make_rollout_set, make_score_set, rollout_records


def test_split_respects_the_budget_longest_first_and_keeps_groups():
    lengths = np.array([10, 3, 7, 3, 12, 5, 4, 9])
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    batches = split_by_tokens(rows, lengths, budget=24)
    assert sorted(r for b in batches for r in b) == rows
    assert all(len(b) * max(lengths[b]) <= 24 for b in batches)
    assert [max(lengths[b]) for b in batches] == sorted((max(lengths[b]) for b in batches), reverse=True)
    assert split_by_tokens([4], lengths, budget=5) == [[4]]  # longer than the budget: alone
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    for batch in split_by_tokens(rows, lengths, budget=30, group_ids=groups):
        assert all(set(np.flatnonzero(groups == groups[r])) <= set(batch) for r in batch)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-root")
    rewards = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0]]
    return open_cache(make_score_set(root, make_rollout_set(root / "rollouts" / "r-budget",
                                                            rollout_records(rewards))).path)


@pytest.mark.slow
def test_a_token_budget_trains_the_same_step_as_one_micro_batch(cache, tmp_path):
    """For a token-mean loss, micro-batches weighted by their token share give the step's own gradient: a budget
    that splits every step into several micro-batches trains the same weights as one micro-batch per step."""
    common = dict(loss="lightning", steps=4, batch_size=8, lr=1e-3, seed=1, allow_teacher_mismatch=True,
                  report_to="none", log_every=1)
    whole = train(STUDENT, cache, TrainConfig(micro_batch_size=8, **common), tmp_path / "whole", quiet=True,
                  root=tmp_path / "root")
    split = train(STUDENT, cache, TrainConfig(max_tokens_per_micro_batch=24, **common), tmp_path / "split",
                  quiet=True, root=tmp_path / "root")
    assert whole.tokens == split.tokens
    a, b = (load_file(str(r.checkpoint / "model.safetensors")) for r in (whole, split))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)  # summation order; Adam magnifies it near 0
