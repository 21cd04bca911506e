"""Small rollout and score sets built without an engine, through the real writers: toy-student-vocabulary rollouts
with hand-set rewards, scored by the toy teacher through a transformers forward pass. For tests that need a
training input in seconds (vLLM would take a minute to start)."""
from __future__ import annotations

import numpy as np
import torch

from lopd.cache import open_cache
from lopd.cache.score_set import ScoreSetWriter
from lopd.rollout_set import write_rollout_set
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR

STUDENT, TEACHER = str(STUDENT_BASE_DIR), str(TEACHER_DIR)


def rollout_records(rewards: list[list[float]], seed: int = 0) -> list[dict]:
    """Groups of toy-student-vocabulary rollouts with the given rewards (one inner list per prompt)."""
    rng = np.random.default_rng(seed)
    records = []
    for group, group_rewards in enumerate(rewards):
        for sample, reward in enumerate(group_rewards):
            length = int(rng.integers(2, 7))
            records.append({"prompt_id": f"p{group}", "group_id": group, "sample_index": sample, "prompt": "ab=",
                            "answer": "abc", "prompt_ids": [1, 4 + group % 20, 5, 40],
                            "response_ids": rng.integers(4, 30, length).tolist(),
                            "behaviour_logprobs": (-rng.random(length)).tolist(), "finish_reason": "stop",
                            "reward": reward})
    return records


def make_rollout_set(path, records):
    from transformers import AutoTokenizer

    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint

    tok = AutoTokenizer.from_pretrained(STUDENT)
    meta = {"id": path.name, "model": STUDENT, "model_fingerprint": model_fingerprint(STUDENT),
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_fingerprint": vocabulary_fingerprint(tok)}
    return write_rollout_set(path, records, meta)


def make_score_set(root, rollouts, k: int = 8, poison: tuple[int, ...] = (), name: str | None = None):
    """Teacher log-probs from a transformers forward pass over each rollout, written through the real writer.

    `poison`: rows whose teacher log-probs are stored as NaN (a broken teacher), for the trainer's non-finite guard.
    """
    from transformers import AutoModelForCausalLM

    from lopd.fingerprint import model_fingerprint

    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    path = root / "scores" / (name or f"s-{rollouts.id}")
    header = {"id": path.name, "kind": "score_set",
              "teacher": {"model": TEACHER, "fingerprint": model_fingerprint(TEACHER)},
              "tokenizer_fingerprint": rollouts.meta["tokenizer_fingerprint"],
              "rollout_set": {"id": rollouts.id, "content_digest": rollouts.meta["content_digest"],
                              "path": f"../../rollouts/{rollouts.id}"},
              "config": {"k": k, "logprob_dtype": "float32"}, "num_rows": len(rollouts)}
    writer = ScoreSetWriter(path, header, rows_per_shard=16)
    for plan in writer.plan(len(rollouts)):
        parts = []
        for i in range(plan.start, plan.stop):
            prompt, response = rollouts.prompt_ids[i], rollouts.response_ids[i]
            with torch.no_grad():
                logp = teacher(input_ids=torch.tensor(np.concatenate([prompt, response]))[None]).logits[0].log_softmax(-1)
            logp = logp[len(prompt) - 1: len(prompt) - 1 + len(response)]
            if i in poison:
                logp = torch.full_like(logp, float("nan"))
            top = logp.topk(k, dim=-1)
            parts.append((logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).numpy(), top.indices.numpy(),
                          top.values.numpy()))
        lengths = [len(p[0]) for p in parts]
        top_values = np.concatenate([p[2] for p in parts])
        with writer.claim(plan) as mine:
            assert mine
            writer.commit(plan, {
                "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                "sampled_logprob": np.concatenate([p[0] for p in parts]).astype(np.float32),
                "topk_ids": np.concatenate([p[1] for p in parts]).astype(np.uint8),
                "topk_logprobs": top_values.astype(np.float32),
                "tail_logprob": np.log(np.clip(1 - np.exp(top_values).sum(-1), 1e-12, None)).astype(np.float32)})
    assert writer.finish(len(rollouts))["complete"]
    return open_cache(path)
