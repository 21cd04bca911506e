"""The online-OPD baseline: every step samples fresh rollouts from the model being trained and scores them live.

This is the reference point offline OPD is measured against (standard OPD re-rolls and re-scores every
step), not a production path: it samples with `transformers.generate` from the training process and scores
with an in-process `transformers` teacher, which is exact but slow. Production rollouts and scoring go
through vLLM (`lopd rollout`, `lopd score`).
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch

from lopd.rollout import SamplingConfig
from lopd.train.data import Batch, collate


class OnlineSampler:
    """An endless stream of freshly sampled and teacher-scored micro-batches: `sampler(student)` is the trainer's
    `batches`. Its prompt order is its own RNG's, which `state_dict` exposes so a resumed run continues it (the
    sampling itself draws from torch's global RNG, which the trainer's checkpoints restore)."""

    def __init__(self, teacher_dir: str, prompt_ids: list[list[int]], sampling: SamplingConfig, *, k: int,
                 micro_batch_size: int, eos_id: int, pad_id: int, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        # a padded teacher's extra embedding rows stay out of the top-k, as in `lopd score` (lopd.score.padded_ids)
        self.defined = len(AutoTokenizer.from_pretrained(teacher_dir))
        self.prompt_ids = prompt_ids
        if sampling.max_tokens is None:
            raise ValueError("OnlineSampler needs an explicit max_tokens (SamplingConfig.within(context))")
        self.k, self.n, self.temperature, self.top_p, self.max_tokens = (k, sampling.n, sampling.temperature,
                                                                         sampling.top_p, sampling.max_tokens)
        self.prompts_per_batch = max(1, micro_batch_size // self.n)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.rng = random.Random(seed)

    def __call__(self, student: torch.nn.Module) -> Iterator[Batch]:
        return self.stream(student)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])

    def stream(self, student: torch.nn.Module) -> Iterator[Batch]:
        while True:
            prompts = [self.prompt_ids[self.rng.randrange(len(self.prompt_ids))] for _ in range(self.prompts_per_batch)]
            items = self.sample(student, [p for p in prompts for _ in range(self.n)])
            yield collate(self.score(items), self.pad_id)

    @torch.no_grad()
    def sample(self, student: torch.nn.Module, prompts: list[list[int]]) -> list[dict[str, Any]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        attention = (torch.arange(width).unsqueeze(0) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(1)).long()
        out = student.generate(
            input_ids=ids, attention_mask=attention, do_sample=True, temperature=self.temperature, top_k=0, top_p=self.top_p,
            max_new_tokens=self.max_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            output_logits=True, return_dict_in_generate=True,
        )
        generated = out.sequences[:, width:]
        # Raw (untempered) log-probs of the sampled tokens, as `lopd rollout` records them.
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        items = []
        for prompt, row, lp in zip(prompts, generated.tolist(), logprobs):
            length = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            items.append({"prompt_ids": np.asarray(prompt), "response_ids": np.asarray(row[:length]),
                          "behaviour_logprobs": lp[:length].numpy(), "reward": float("nan"), "group_id": 0})
        return items

    @torch.no_grad()
    def score(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        batch = collate(items, self.pad_id)
        logits = self.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = batch.response_rows(logits).float().log_softmax(-1)
        sampled = logprobs.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
        top = logprobs[..., : self.defined].topk(self.k, dim=-1)
        for i, item in enumerate(items):
            t = len(item["response_ids"])
            item.update(teacher_logprobs=sampled[i, :t].numpy(), topk_ids=top.indices[i, :t].numpy(),
                        topk_logprobs=top.values[i, :t].numpy())
        return items
