"""Training batches from a score set (or, for SFT, a bare rollout set), padded and aligned to response positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lopd.cache.reader import ScoreCache
from lopd.errors import LopdError
from lopd.losses.base import LossInputs
from lopd.rollout_set import RolloutSet


class SequenceDataset(Dataset):
    """Item i = rollout row i as numpy arrays; teacher fields present only when backed by a score set."""

    def __init__(self, source: ScoreCache | RolloutSet, base: ScoreCache | None = None):
        self.cache = source if isinstance(source, ScoreCache) else None
        self.rollouts = source.rollouts if isinstance(source, ScoreCache) else source
        self.base = base  # a second score set over the same rollouts, scored by the base/reference model (G-OPD)
        self.replaced: dict[int, tuple[ScoreCache, int]] = {}  # row -> (refreshed score set, its row)
        if base is not None and (self.cache is None or base.rollouts.id != self.rollouts.id):
            raise LopdError("the base score set must score the same rollout set as the teacher cache")

    def __len__(self) -> int:
        return len(self.rollouts)

    def replace(self, index: int, cache: ScoreCache, row: int) -> None:
        """Serve row `index` from a refreshed score set from now on (its group id is kept)."""
        if self.base is not None:
            raise LopdError("cache refresh cannot be combined with a base score set (G-OPD) yet")
        self.replaced[index] = (cache, row)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.cache is not None:
            cache, row = self.replaced.get(index, (self.cache, index))
            seq = cache[row]
            item = {
                "row": index,
                "prompt_ids": seq.prompt_ids, "response_ids": seq.response_ids,
                "behaviour_logprobs": seq.behaviour_logprobs, "reward": seq.reward,
                "group_id": int(self.rollouts.group_ids[index]),
                "teacher_logprobs": seq.teacher_logprobs, "topk_ids": seq.topk_ids, "topk_logprobs": seq.topk_logprobs,
            }
            if self.base is not None:
                item["base_logprobs"] = self.base[index].teacher_logprobs
            return item
        r = self.rollouts
        return {
            "row": index, "prompt_ids": r.prompt_ids[index], "response_ids": r.response_ids[index],
            "behaviour_logprobs": r.behaviour_logprobs[index], "reward": float(r.rewards[index]),
            "group_id": int(r.group_ids[index]),
        }


@dataclass
class Batch:
    """Right-padded model inputs plus response-aligned targets; `positions[b, t]` indexes the logits predicting response token t."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor | None  # dataset row of each sequence (None for live-sampled batches)
    positions: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    fields: dict[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())

    def loss_inputs(self, logits: torch.Tensor) -> LossInputs:
        """Select the logits that predict each response token: [B, L, V] -> [B, T, V]."""
        index = self.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return LossInputs(logits=logits.gather(1, index), tokens=self.tokens, mask=self.mask, **self.fields)


def _pad(arrays: list[np.ndarray], width: int, value, dtype) -> torch.Tensor:
    out = np.full((len(arrays), width) + arrays[0].shape[1:], value, dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out)


def collate(items: list[dict[str, Any]], pad_id: int) -> Batch:
    prompts = [i["prompt_ids"] for i in items]
    responses = [i["response_ids"] for i in items]
    sequences = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in sequences)
    steps = max(1, max(len(r) for r in responses))
    input_ids = _pad(sequences, width, pad_id, np.int64)
    attention = _pad([np.ones(len(s), np.int64) for s in sequences], width, 0, np.int64)
    tokens = _pad(responses, steps, pad_id, np.int64)
    mask = _pad([np.ones(len(r), np.float32) for r in responses], steps, 0.0, np.float32)
    # Logit row p predicts token p+1, so response token t of row b comes from row len(prompt_b) - 1 + t.
    starts = torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1)
    positions = (starts + torch.arange(steps).unsqueeze(0)).clamp_max(width - 1)
    fields: dict[str, torch.Tensor] = {
        "behaviour_logprobs": _pad([i["behaviour_logprobs"] for i in items], steps, 0.0, np.float32),
        "rewards": torch.tensor([i["reward"] for i in items], dtype=torch.float32),
        "group_ids": torch.tensor([i["group_id"] for i in items], dtype=torch.int64),
    }
    if "teacher_logprobs" in items[0]:
        fields["teacher_logprobs"] = _pad([i["teacher_logprobs"].astype(np.float32) for i in items], steps, 0.0, np.float32)
        fields["topk_ids"] = _pad([i["topk_ids"].astype(np.int64) for i in items], steps, 0, np.int64)
        fields["topk_logprobs"] = _pad([i["topk_logprobs"].astype(np.float32) for i in items], steps, 0.0, np.float32)
    if "base_logprobs" in items[0]:
        fields["base_logprobs"] = _pad([i["base_logprobs"].astype(np.float32) for i in items], steps, 0.0, np.float32)
    rows = torch.tensor([i["row"] for i in items]) if "row" in items[0] else None
    return Batch(input_ids, attention, rows, positions, tokens, mask, fields)
