"""Shuffled training order over a sharded cache, and micro-batches of whole groups.

The cache reader keeps only a few decoded shards in memory (lopd.cache.reader), so a shuffle over every row of
a many-shard cache would decode a shard for almost every row. Like WebDataset's shard shuffle, the order here
takes the shards in shuffled order, a window of them at a time (the reader's decoded-shard budget), and shuffles
rows (or groups) within each window; when every shard fits in one window it is the plain global shuffle.

Group-relative losses (GRPO and everything built on its advantage, Uni-OPD's per-group calibration) compare a
rollout with its siblings. Shuffling rows would split every group across micro-batches, where a batch-level
group advantage is almost always 0; so, as verl and TRL do, these losses shuffle groups, not rows.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lopd.errors import LopdError


def window_shuffle(row_shards: np.ndarray, window: int, generator: torch.Generator) -> list[int]:
    """A permutation of units (rows or groups; `row_shards[u]` is the shard unit u lives in) that keeps at most
    `window` shards in play at a time; `torch.randperm` itself when every shard fits in one window."""
    num_shards = int(row_shards.max()) + 1 if len(row_shards) else 0
    if num_shards <= window:
        return torch.randperm(len(row_shards), generator=generator).tolist()
    position = torch.empty(num_shards, dtype=torch.long)
    position[torch.randperm(num_shards, generator=generator)] = torch.arange(num_shards)
    unit_window = (position[torch.as_tensor(row_shards, dtype=torch.long)] // window).numpy()
    order: list[int] = []
    for w in range(-(-num_shards // window)):
        units = np.flatnonzero(unit_window == w)
        order += units[torch.randperm(len(units), generator=generator).numpy()].tolist()
    return order


class ShardWindowSampler:
    """Row indices in `window_shuffle` order, padded to a multiple of the world size, each rank every world-th row.

    Padding and striding are DistributedSampler's (drop_last=False), so with every shard in one window the
    order is exactly DistributedSampler's and runs made before the reader's shard budget existed reproduce.
    """

    def __init__(self, row_shards: np.ndarray, window: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.row_shards, self.window, self.rank, self.world, self.seed, self.epoch = row_shards, window, rank, world, seed, 0
        self.total = -(-len(row_shards) // world) * world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = window_shuffle(self.row_shards, self.window, torch.Generator().manual_seed(self.seed + self.epoch))
        order = (order * -(-self.total // max(len(order), 1)))[: self.total]
        return iter(order[self.rank : self.total : self.world])

    def __len__(self) -> int:
        return self.total // self.world


class GroupBatchSampler:
    """Row indices of micro-batches made of whole groups, shuffled per epoch, each rank its share of the groups.

    A micro-batch takes groups in shuffled order while they fit in `micro` rows, so it holds at most `micro` rows
    (fewer when group sizes do not divide it).
    """

    def __init__(self, group_ids: np.ndarray, micro: int, rank: int = 0, world: int = 1, seed: int = 0,
                 row_shards: np.ndarray | None = None, window: int = 1):
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
        # each group's shard is its first row's (a group straddling two shards also touches the next one)
        self.group_shards = (np.zeros(len(self.groups), np.int64) if row_shards is None
                         else np.asarray([row_shards[rows[0]] for rows in self.groups]))
        self.window = window

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = window_shuffle(self.group_shards, self.window, generator)[self.rank :: self.world]
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


def split_by_tokens(rows: list[int], lengths: np.ndarray, budget: int, group_ids: np.ndarray | None = None) -> list[list[int]]:
    """One optimizer step's rows as micro-batches of at most `budget` padded tokens (rows x longest sequence).

    Rows are taken longest first, so each micro-batch holds rows of similar length and short rollouts are not
    padded to the longest of the step. With `group_ids` whole groups move together (group-relative losses). A
    row (or group) longer than the budget alone still forms its own micro-batch: a sequence cannot be split.
    """
    units: dict[int, list[int]] = {}
    for row in rows:
        units.setdefault(int(group_ids[row]) if group_ids is not None else row, []).append(row)
    ordered = sorted(units.values(), key=lambda unit: -max(int(lengths[r]) for r in unit))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for unit in ordered:
        unit_longest = max(int(lengths[r]) for r in unit)
        if current and (len(current) + len(unit)) * max(longest, unit_longest) > budget:
            batches.append(current)
            current, longest = [], 0
        current += unit
        longest = max(longest, unit_longest)
    if current:
        batches.append(current)
    return batches
