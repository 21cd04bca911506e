"""Training batches from a score set (or, for SFT, a bare rollout set), padded and aligned to response positions."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lopd.cache.reader import ScoreCache
from lopd.errors import LopdError
from lopd.losses.base import LossInputs
from lopd.losses.student import StudentLogprobs, StudentRequest
from lopd.rollout_set import RolloutSet


# LossInputs fields that an attached score set fills -> the role of that score set, for messages.
ATTACHABLE = {"base_logprobs": "base", "contrast_logprobs": "contrast"}


def available_fields(source: ScoreCache | RolloutSet | None, attached: dict[str, ScoreCache] | None = None) -> set[str]:
    """The LossInputs fields batches from `source` (plus attached score sets) carry, for checking a loss's needs."""
    if source is None:
        return set()
    rollouts = source.rollouts if isinstance(source, ScoreCache) else source
    available = {"behaviour_logprobs", "group_ids"} | set(attached or {})
    if isinstance(source, ScoreCache):
        available |= {"teacher_logprobs", "topk"}
    if np.isfinite(rollouts.rewards).all():  # a rollout set made without --verifier stores NaN rewards
        available.add("rewards")
    if np.isfinite(rollouts.rubric_rewards).any():
        available.add("rubric_rewards")
    return available


class SequenceDataset(Dataset):
    """Item i = rollout row i as numpy arrays; teacher fields present only when backed by a score set."""

    def __init__(self, source: ScoreCache | RolloutSet, attached: dict[str, ScoreCache] | None = None):
        self.cache = source if isinstance(source, ScoreCache) else None
        self.rollouts = source.rollouts if isinstance(source, ScoreCache) else source
        # Further score sets over the same rollouts, by the LossInputs field their sampled-token log-probs fill:
        # "base_logprobs" (G-OPD's base model), "contrast_logprobs" (RLCSD's incorrect-hint self-teacher).
        self.attached = dict(attached or {})
        self.replaced: dict[int, tuple[ScoreCache, int]] = {}  # row -> (refreshed score set, its row)
        for name, cache in self.attached.items():
            if name not in ATTACHABLE:
                raise LopdError(f"a score set can be attached as {', '.join(ATTACHABLE)}, not {name!r}")
            if self.cache is None or cache.rollouts.id != self.rollouts.id:
                raise LopdError(f"the {ATTACHABLE[name]} score set {cache.id} must score the same rollout set as the "
                                f"teacher cache ({self.rollouts.id}), not {cache.rollouts.id}")

    def __len__(self) -> int:
        return len(self.rollouts)

    def row_shards(self) -> tuple[np.ndarray, int]:
        """The cache shard of every row and how many shards the reader keeps decoded (the shuffle window);
        a bare rollout set is one shard."""
        if self.cache is None:
            return np.zeros(len(self), np.int64), 1
        return np.arange(len(self)) // self.cache.manifest["rows_per_shard"], self.cache.max_decoded_shards

    def sequence_lengths(self) -> np.ndarray:
        """Prompt + response tokens of every row (what a micro-batch pads to), without reading the cache."""
        r = self.rollouts
        return np.array([len(p) + len(q) for p, q in zip(r.prompt_ids, r.response_ids)], dtype=np.int64)

    def replace(self, index: int, cache: ScoreCache, row: int) -> None:
        """Serve row `index` from a refreshed score set from now on (its group id is kept)."""
        if self.attached:
            raise LopdError(f"cache refresh cannot be combined with attached score sets ({', '.join(self.attached)}) "
                            "yet: they would not be re-scored")
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
                "tail_logprob": seq.tail_logprob,
                # a refreshed row comes from the refreshed score set's own rollout set
                "loss_mask": cache.rollouts.loss_mask(row),
                "rubric_reward": float(cache.rollouts.rubric_rewards[row]),
            }
            for name, attached in self.attached.items():
                item[name] = attached[index].teacher_logprobs
            return item
        r = self.rollouts
        return {
            "row": index, "prompt_ids": r.prompt_ids[index], "response_ids": r.response_ids[index],
            "behaviour_logprobs": r.behaviour_logprobs[index], "reward": float(r.rewards[index]),
            "group_id": int(r.group_ids[index]),
            "loss_mask": r.loss_mask(index), "rubric_reward": float(r.rubric_rewards[index]),
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

    def to(self, device: torch.device | str) -> "Batch":
        """The batch on `device` (the engine's: DeepSpeed does not move inputs)."""
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "fields"},
                     fields={key: move(value) for key, value in self.fields.items()})

    def response_rows(self, states: torch.Tensor) -> torch.Tensor:
        """The rows of per-position `states` that predict each response token: [B, L, D] -> [B, T, D]."""
        index = self.positions.unsqueeze(-1).expand(-1, -1, states.shape[-1])
        return states.gather(1, index)

    def loss_inputs(self, student: StudentLogprobs) -> LossInputs:
        """The batch's loss inputs around the student's gathered log-probs."""
        return LossInputs(student=student, tokens=self.tokens, mask=self.mask, **self.fields)

    def loss_inputs_from_logits(self, logits: torch.Tensor, request: StudentRequest = StudentRequest()) -> LossInputs:
        """Loss inputs from full logits [B, L, V]: the unchunked path, for diagnostics that need every logit."""
        student = StudentLogprobs.from_logits(self.response_rows(logits), self.tokens, self.mask,
                                              self.fields.get("topk_ids"), request)
        return self.loss_inputs(student)


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
    # 1 on the tokens the model generated, 0 on tool observations (loss_mask) and on padding; items built
    # without a loss mask (live-sampled batches) count every response token.
    mask = _pad([np.asarray(i["loss_mask"], np.float32) if i.get("loss_mask") is not None else np.ones(len(r), np.float32)
                 for i, r in zip(items, responses)], steps, 0.0, np.float32)
    # Logit row p predicts token p+1, so response token t of row b comes from row len(prompt_b) - 1 + t.
    starts = torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1)
    positions = (starts + torch.arange(steps).unsqueeze(0)).clamp_max(width - 1)
    fields: dict[str, torch.Tensor] = {
        "behaviour_logprobs": _pad([i["behaviour_logprobs"] for i in items], steps, 0.0, np.float32),
        "rewards": torch.tensor([i["reward"] for i in items], dtype=torch.float32),
        "group_ids": torch.tensor([i["group_id"] for i in items], dtype=torch.int64),
    }
    rubric = [float(i.get("rubric_reward", np.nan)) for i in items]
    if any(np.isfinite(rubric)):
        fields["rubric_rewards"] = torch.tensor(rubric, dtype=torch.float32)  # NaN where a row has no rubric score
    if "teacher_logprobs" in items[0]:
        fields["teacher_logprobs"] = _pad([i["teacher_logprobs"].astype(np.float32) for i in items], steps, 0.0, np.float32)
        fields["topk_ids"] = _pad([i["topk_ids"].astype(np.int64) for i in items], steps, 0, np.int64)
        fields["topk_logprobs"] = _pad([i["topk_logprobs"].astype(np.float32) for i in items], steps, 0.0, np.float32)
    if "tail_logprob" in items[0]:
        fields["tail_logprob"] = _pad([i["tail_logprob"].astype(np.float32) for i in items], steps, 0.0, np.float32)
    for name in ATTACHABLE:
        if name in items[0]:
            fields[name] = _pad([i[name].astype(np.float32) for i in items], steps, 0.0, np.float32)
    rows = torch.tensor([i["row"] for i in items]) if "row" in items[0] else None
    return Batch(input_ids, attention, rows, positions, tokens, mask, fields)
