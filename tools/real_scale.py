"""Random-weight real-architecture models for measuring lopd at real scale, with no model hub.

A Qwen3-architecture causal LM at the real vocabulary (151,936 embedding rows; the tokenizer defines
151,669 ids, like Qwen3's) but a small hidden size, so memory effects that scale with T x V show up on a
CPU. The tokenizer is a `tokenizers` WordLevel model over synthetic words `t0 ... tN`, which vLLM and
transformers both load. Used by tools/bench_train_memory.py and tests that need the real vocabulary.

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    print(build_qwen3(args.out_dir, layers=args.layers, hidden=args.hidden))
