"""Micro-batches of whole groups: the rollouts of one prompt train side by side.

Group-relative losses (GRPO and everything built on its advantage, Uni-OPD's per-group calibration) compare a
rollout with its siblings. Shuffling rows would split every group across micro-batches, where a batch-level
group advantage is almost always 0; so, as verl and TRL do, these losses shuffle groups, not rows.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lopd.errors import LopdError


class GroupBatchSampler:
    """Row indices of micro-batches made of whole groups, shuffled per epoch, each rank its share of the groups.

    A micro-batch takes groups in shuffled order while they fit in `micro` rows, so it holds at most `micro` rows
    (fewer when group sizes do not divide it).
    """

    def __init__(self, group_ids: np.ndarray, micro: int, rank: int = 0, world: int = 1, seed: int = 0):
        _, first, inverse = np.unique(np.asarray(group_ids), return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # groups in order of first appearance
        rows_of = {g: [] for g in range(len(first))}
        for row, g in enumerate(inverse.reshape(-1)):
            rows_of[int(g)].append(row)
        self.groups = [rows_of[int(g)] for g in order]
        largest = max(len(rows) for rows in self.groups)
        if largest > micro:
            raise LopdError(f"a group of {largest} rollouts does not fit in a micro-batch of {micro} rows; this loss "
                            f"needs whole groups per micro-batch: raise --micro-batch-size to a multiple of the "
                            f"rollouts per prompt (`lopd rollout --n`)")
        self.micro, self.rank, self.world, self.seed, self.epoch = micro, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.groups), generator=generator).tolist()[self.rank :: self.world]
        batch: list[int] = []
        for g in order:
            if batch and len(batch) + len(self.groups[g]) > self.micro:
                yield batch
                batch = []
            batch += self.groups[g]
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)
