"""Random-weight real-architecture models for measuring lopd at real scale, with no model hub.

A Qwen3-architecture causal LM at the real vocabulary (151,936 embedding rows; the tokenizer defines
151,669 ids, like Qwen3's) but a small hidden size, so memory effects that scale with T x V show up on a
CPU. The tokenizer is a `tokenizers` WordLevel model over synthetic words `t0 ... tN`, which vLLM and
transformers both load. Used by tools/bench_train_memory.py, tools/bench_score_memory.py and tests that need
the real vocabulary.

    python tools/real_scale.py OUT_DIR [--layers 2 --hidden 256]
"""
from __future__ import annotations

import argparse
from pathlib import Path

QWEN3_VOCAB = 151_936  # embedding rows (padded)
QWEN3_TOKENS = 151_669  # ids the tokenizer defines
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tokenizer(tokens: int = QWEN3_TOKENS):
    """A fast tokenizer with exactly `tokens` ids: the specials first, then words t0 ... (whitespace-split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"t{i}": len(SPECIALS) + i for i in range(tokens - len(SPECIALS))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIALS[0], pad_token=SPECIALS[0],
                                   unk_token=SPECIALS[0])


def build_qwen3(out_dir: str | Path, *, layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 64, intermediate: int = 768, vocab: int = QWEN3_VOCAB, max_positions: int = 32_768,
                seed: int = 0) -> Path:
    """Save a random-weight Qwen3ForCausalLM (float32) and its tokenizer to `out_dir`; reuse it if already there."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                         max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=0,
                         pad_token_id=0, bos_token_id=None)
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    build_tokenizer(min(QWEN3_TOKENS, vocab)).save_pretrained(out)
    return out


def synthetic_rollout_set(root: str | Path, model_dir: str | Path, *, rows: int, prompt_tokens: int,
                          response_tokens: int, seed: int = 0):
    """A rollout set of `rows` random-token rows generated "by" `model_dir` (random ids, behaviour log-probs and
    rewards), written through lopd's real rollout writer under `root`/rollouts: what `lopd score` and `lopd train`
    read, at any length, without an engine. Returns the RolloutSet; reused when it already exists."""
    import numpy as np
    from transformers import AutoTokenizer

    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
    from lopd.rollout_set import RolloutSet, write_rollout_set

    model = str(Path(model_dir).resolve())
    path = Path(root) / "rollouts" / f"r-synthetic-{rows}x{prompt_tokens}+{response_tokens}-s{seed}"
    if not (path / "meta.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokens = len(tokenizer)
        rng = np.random.default_rng(seed)
        records = [{"prompt_id": f"p{i}", "group_id": i, "sample_index": 0, "prompt": "", "answer": "",
                    "prompt_ids": rng.integers(len(SPECIALS), tokens, prompt_tokens).tolist(),
                    "response_ids": rng.integers(len(SPECIALS), tokens, response_tokens).tolist(),
                    "behaviour_logprobs": (-rng.random(response_tokens) * 12).tolist(), "finish_reason": "length",
                    "reward": float(i % 2)} for i in range(rows)]
        meta = {"id": path.name, "model": model, "model_fingerprint": model_fingerprint(model),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_fingerprint": vocabulary_fingerprint(tokenizer)}
        write_rollout_set(path, records, meta)
    return RolloutSet(path)


def synthetic_score_set(root: str | Path, model_dir: str | Path, *, rows: int, prompt_tokens: int,
                        response_tokens: int, k: int = 32, rows_per_shard: int = 16, seed: int = 0):
    """A rollout set of `rows` random-token rows generated "by" `model_dir` (`synthetic_rollout_set`) and a top-k
    score set over it with the model as its own teacher, written through lopd's real writers (no engine): random
    teacher log-probs, real layout, real sizes. Returns the opened ScoreCache; reused when it already exists under
    `root`."""
    import numpy as np
    from transformers import AutoTokenizer

    from lopd.cache.layout import id_dtype
    from lopd.cache.reader import open_cache
    from lopd.cache.score_set import ScoreSetWriter
    from lopd.fingerprint import model_fingerprint

    name = f"synthetic-{rows}x{prompt_tokens}+{response_tokens}-k{k}-s{seed}"
    root, model = Path(root), str(Path(model_dir).resolve())
    scores = root / "scores" / f"s-{name}"
    if (scores / "manifest.json").exists():
        return open_cache(scores)
    rollouts = synthetic_rollout_set(root, model, rows=rows, prompt_tokens=prompt_tokens,
                                     response_tokens=response_tokens, seed=seed)
    rng = np.random.default_rng([seed, k])
    tokens = len(AutoTokenizer.from_pretrained(model))
    vocab = QWEN3_VOCAB
    header = {"id": scores.name, "kind": "score_set", "teacher": {"model": model, "fingerprint": model_fingerprint(model)},
              "tokenizer_fingerprint": rollouts.meta["tokenizer_fingerprint"],
              "rollout_set": {"id": rollouts.id, "content_digest": rollouts.meta["content_digest"],
                              "path": f"../../rollouts/{rollouts.id}"},
              "config": {"k": k, "logprob_dtype": "float16"}, "num_rows": rows, "vocab_size": vocab,
              "id_dtype": str(id_dtype(vocab))}
    writer = ScoreSetWriter(scores, header, rows_per_shard=rows_per_shard)
    for plan in writer.plan(rows):
        n = (plan.stop - plan.start) * response_tokens
        top = np.sort(-rng.random((n, k)) * 10 - 0.1, axis=1)[:, ::-1]
        ids = (rng.integers(0, tokens, (n, 1)) + np.arange(k) * 4099) % tokens  # k distinct ids per position
        with writer.claim(plan) as mine:
            assert mine
            writer.commit(plan, {
                "offsets": np.arange(0, n + 1, response_tokens, dtype=np.int64),
                "sampled_logprob": (-rng.random(n) * 12).astype(np.float16),
                "topk_ids": ids.astype(id_dtype(vocab)), "topk_logprobs": top.astype(np.float16),
                "tail_logprob": np.log(np.clip(1 - np.exp(top).sum(-1), 1e-6, None)).astype(np.float16)})
    assert writer.finish(rows)["complete"]
    return open_cache(scores)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    print(build_qwen3(args.out_dir, layers=args.layers, hidden=args.hidden))
