"""Group-preserving micro-batches for group-relative losses (lopd.train.sampling)."""
from __future__ import annotations

import numpy as np
import pytest

from lopd.errors import LopdError
from lopd.train.sampling import GroupBatchSampler, ShardWindowSampler

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


@pytest.mark.parametrize("rows,world", [(40, 1), (41, 2), (3, 4)])
def test_one_window_is_exactly_the_distributed_sampler_order(rows, world):
    """Caches that fit in the reader's shard budget keep the order runs had before the budget existed."""
    from torch.utils.data import DistributedSampler

    for rank in range(world):
        ours = ShardWindowSampler(np.arange(rows) // 4, window=rows, rank=rank, world=world, seed=5)
        theirs = DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=False)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def lru_decodes(shards_in_order: list[int], capacity: int) -> int:
    """How many shard decodes a reader keeping `capacity` decoded shards (LRU) does for this access order."""
    held: list[int] = []
    decodes = 0
    for shard in shards_in_order:
        if shard in held:
            held.remove(shard)
        else:
            decodes += 1
            held = held[-(capacity - 1):] if capacity > 1 else []
        held.append(shard)
    return decodes


def test_shard_windows_decode_each_shard_once_per_epoch():
    shards = np.arange(100) // 5  # 20 shards of 5 rows
    ranks = [ShardWindowSampler(shards, window=3, rank=r, world=2, seed=1) for r in range(2)]
    assert sorted(i for s in ranks for i in s) == list(range(100))
    for sampler in ranks:
        seen = [int(shards[i]) for i in sampler]
        assert lru_decodes(seen, 3) == len(set(seen))
    assert lru_decodes([int(shards[i]) for i in np.random.default_rng(0).permutation(100)], 3) > 60  # plain shuffle
    grouped = GroupBatchSampler(np.arange(100) // 5, micro=10, seed=1, row_shards=shards, window=3)  # groups = shards
    assert sorted(r for b in grouped for r in b) == list(range(100))
    assert lru_decodes([int(shards[r]) for b in grouped for r in b], 3) == 20
