"""Group-preserving micro-batches for group-relative losses (lopd.train.sampling)."""
from __future__ import annotations

import numpy as np
import pytest

from lopd.errors import LopdError
from lopd.train.sampling import GroupBatchSampler

GROUPS = np.repeat(np.arange(10), 4)  # 10 prompts x 4 rollouts, rows of a group adjacent as `lopd rollout` writes them


def test_every_row_once_per_epoch_in_whole_groups_across_ranks():
    ranks = [GroupBatchSampler(GROUPS, micro=10, rank=r, world=2, seed=3) for r in range(2)]
    batches = [b for s in ranks for b in s]
    rows = sorted(r for b in batches for r in b)
    assert rows == list(range(len(GROUPS)))
    for batch in batches:
        assert len(batch) <= 10
        for g in set(GROUPS[batch]):
            assert (GROUPS[batch] == g).sum() == 4  # never split
    assert all(len(s) == sum(1 for _ in s) for s in ranks)


def test_epochs_reshuffle_the_groups_reproducibly():
    sampler = GroupBatchSampler(GROUPS, micro=8, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_a_group_larger_than_the_micro_batch_is_refused():
    with pytest.raises(LopdError, match="a group of 4 rollouts does not fit in a micro-batch of 3 rows"):
        GroupBatchSampler(GROUPS, micro=3)
