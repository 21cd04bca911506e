"""Reading a score set: `open_cache(path)[i]` joins teacher signals with the rollout row they score."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from lopd.cache.layout import FORMAT_VERSION, read_shard_checked
from lopd.cache.score_set import MANIFEST, read_manifest, shard_location
from lopd.errors import LopdError
from lopd.location import as_location, is_dir, is_file, join, resolve
from lopd.rollout_set import RolloutSet


@dataclass
class CachedSequence:
    """One rollout with its teacher signal; per-position arrays have length = response length."""

    index: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    behaviour_logprobs: np.ndarray
    reward: float
    group_id: int
    teacher_logprobs: np.ndarray  # log pi_T(y_t | s_t) of the sampled token, even outside the top-k
    topk_ids: np.ndarray  # [T, k]
    topk_logprobs: np.ndarray  # [T, k], descending
    tail_logprob: np.ndarray  # log(1 - sum of top-k probabilities)

    @property
    def tail_mass(self) -> np.ndarray:
        return np.exp(self.tail_logprob.astype(np.float32))


DEFAULT_MAX_DECODED_SHARDS = 8
# True since a rerun of `lopd score` checks an existing set and rescores exactly its damaged shards.
REPAIR_HINT = "rescore it with `lopd cache repair {id}` (or rerun the `lopd score` command that made the set)"


class ScoreCache:
    """A committed score set. Shards are read whole on first use and checked against their manifest checksum.

    At most `max_decoded_shards` decoded shards stay in memory (least recently used goes first), so host memory
    is bounded by the shard size, not the cache size; rows are copied out of their shard so a caller holding a
    row does not pin an evicted shard. Only the shards holding rows that are read get decoded at all, so each
    training rank decodes just the shards of its own rows, and the training order reads rows a window of
    `max_decoded_shards` shards at a time (lopd.train.sampling), so each shard is decoded once per epoch.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True,
                 max_decoded_shards: int = DEFAULT_MAX_DECODED_SHARDS):
        self.path = as_location(path)  # a local directory, or a bucket URL (lopd.location)
        manifest_path = join(self.path, MANIFEST)
        if not is_file(manifest_path):
            raise LopdError(f"{self.path} holds no score set (no {MANIFEST}); create one with `lopd score`")
        self.manifest: dict[str, Any] = read_manifest(self.path)
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise LopdError(f"score set {self.path} has format version {version}; this lopd reads version {FORMAT_VERSION}")
        if not self.manifest.get("complete"):
            raise LopdError(f"score set {self.path} is incomplete (scoring was interrupted); rerun the same `lopd score` to finish it")
        if max_decoded_shards < 1:
            raise LopdError(f"--max-decoded-shards must be at least 1, got {max_decoded_shards}")
        self.verify = verify
        self.max_decoded_shards = max_decoded_shards
        self._shards: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.decodes = 0  # shards read and decoded so far (re-reads after eviction included)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def k(self) -> int:
        return int(self.manifest["config"]["k"])

    @cached_property
    def rollouts(self) -> RolloutSet:
        return RolloutSet.open(resolve(join(self.path, self.manifest["rollout_set"]["path"])))

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    def shard_of(self, index: int) -> tuple[str, int]:
        per = self.manifest["rows_per_shard"]
        return f"{index // per:05d}", index % per

    @property
    def decoded_shards(self) -> int:
        """How many decoded shards are held in memory now (at most `max_decoded_shards`)."""
        return len(self._shards)

    def shard(self, name: str) -> dict[str, np.ndarray]:
        if name in self._shards:
            self._shards.move_to_end(name)
        else:
            entry = self.manifest["shards"].get(name)
            if entry is None or not is_dir(shard_dir := shard_location(self.path, name, entry)):
                raise LopdError(f"score set {self.id}: shard {name} is missing; {REPAIR_HINT.format(id=self.id)}")
            try:
                arrays = read_shard_checked(shard_dir, entry["checksum"] if self.verify else None)
            except Exception as exc:  # zarr/codec errors on damaged bytes
                raise LopdError(f"score set {self.id}: shard {name} cannot be read ({exc}); "
                                f"{REPAIR_HINT.format(id=self.id)}") from None
            if arrays is None:
                raise LopdError(f"score set {self.id}: shard {name} is corrupt (checksum mismatch); "
                                f"{REPAIR_HINT.format(id=self.id)}")
            self.decodes += 1
            self._shards[name] = arrays
            while len(self._shards) > self.max_decoded_shards:
                self._shards.popitem(last=False)
        return self._shards[name]

    def __getitem__(self, index: int) -> CachedSequence:
        if not 0 <= index < len(self):
            raise IndexError(index)
        name, local = self.shard_of(index)
        arrays = self.shard(name)
        lo, hi = arrays["offsets"][local], arrays["offsets"][local + 1]
        r = self.rollouts
        return CachedSequence(
            index=index,
            prompt_ids=r.prompt_ids[index],
            response_ids=r.response_ids[index],
            behaviour_logprobs=r.behaviour_logprobs[index],
            reward=float(r.rewards[index]),
            group_id=int(r.group_ids[index]),
            teacher_logprobs=arrays["sampled_logprob"][lo:hi].copy(),
            topk_ids=arrays["topk_ids"][lo:hi].copy(),
            topk_logprobs=arrays["topk_logprobs"][lo:hi].copy(),
            tail_logprob=arrays["tail_logprob"][lo:hi].copy(),
        )


def open_cache(path: str | os.PathLike, verify: bool = True,
               max_decoded_shards: int = DEFAULT_MAX_DECODED_SHARDS) -> ScoreCache:
    return ScoreCache(path, verify=verify, max_decoded_shards=max_decoded_shards)
