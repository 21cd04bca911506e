"""Rebuild the bundled toy world deterministically: dictionary, tokenizer, teacher and student base.

    python tools/build_toy_models.py            # writes lopd/toy/assets/ (about 6 minutes on 2 CPU cores)

The teacher (Qwen2, 4 layers, hidden 128, head_dim 32) is trained with plain PyTorch until it completes
most held-out prefixes into valid dictionary words at temperature 1. The student base (Qwen2, 2 layers,
hidden 64, head_dim 32) is left at its seeded random initialisation: the demo's SFT stage teaches it.
Head dims are 32 because vLLM's CPU attention kernel supports no smaller head.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from lopd.toy import ASSETS
from lopd.toy import words as world
from lopd.toy.tokenizer import save_char_tokenizer

MAX_POSITIONS = 64


def model_config(tok, hidden: int, layers: int, heads: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )


def batch_of_sequences(tok, dictionary: list[str], rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prefix/word pairs as padded ids plus labels that cover only the completion and <eos>."""
    seqs, labels = [], []
    for _ in range(size):
        word = rng.choice(dictionary)
        cut = rng.randint(1, 2)
        prompt = tok(word[:cut] + world.SEPARATOR)["input_ids"]
        completion = tok(word[cut:], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(map(len, seqs))
    ids = torch.full((size, width), tok.pad_token_id)
    lab = torch.full((size, width), -100)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


@torch.no_grad()
def valid_rate(model, tok, prompts, temperature: float = 1.0) -> tuple[float, int]:
    """Fraction of sampled completions that are dictionary words, and how many distinct words were hit."""
    model.eval()
    enc = [tok(p.prompt)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
    attn = (ids != tok.pad_token_id).long()
    out = model.generate(
        input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_k=0,
        max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    hits = set()
    valid = 0
    for p, row in zip(prompts, out[:, width:]):
        text = tok.decode(row, skip_special_tokens=True)
        if world.verify({"prompt": p.prompt}, text):
            valid += 1
            hits.add(world.completed_word(p.prompt, text))
    model.train()
    return valid / len(prompts), len(hits)


def train_teacher(tok, dictionary, out_dir: Path, max_steps: int, target: float, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Qwen2ForCausalLM(model_config(tok, hidden=128, layers=4, heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))
    )
    probe = world.make_prompts("test", 500, dictionary)
    start = time.time()
    history = []
    for step in range(1, max_steps + 1):
        ids, labels = batch_of_sequences(tok, dictionary, rng, 256)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 250 == 0 or step == max_steps:
            rate, distinct = valid_rate(model, tok, probe)
            history.append({"step": step, "loss": round(loss.item(), 4), "valid": rate, "distinct": distinct})
            print(f"teacher step {step}: loss {loss.item():.3f} valid@T1 {rate:.3f} distinct {distinct} "
                  f"({time.time() - start:.0f}s)", flush=True)
            if rate >= target and step >= 1500:
                break
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"steps": step, "seconds": round(time.time() - start, 1), "history": history}


def save_student_base(tok, out_dir: Path, seed: int) -> None:
    torch.manual_seed(seed)
    Qwen2ForCausalLM(model_config(tok, hidden=64, layers=2, heads=2)).save_pretrained(out_dir, safe_serialization=True)


def finish_model_dir(tok, out_dir: Path) -> None:
    tok.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--dictionary-size", type=int, default=800)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--target", type=float, default=0.95, help="stop once valid@T=1 on 500 probes reaches this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dictionary = world.make_dictionary(args.dictionary_size)
    (out / "words.txt").write_text("\n".join(dictionary) + "\n")
    tok = save_char_tokenizer(out / "tokenizer")

    for name in ("teacher", "student_base"):
        shutil.rmtree(out / name, ignore_errors=True)
    report = {"dictionary_size": len(dictionary)}
    report["teacher"] = train_teacher(tok, dictionary, out / "teacher", args.max_steps, args.target, args.seed)
    save_student_base(tok, out / "student_base", args.seed + 1)
    for name in ("teacher", "student_base"):
        finish_model_dir(tok, out / name)
    (out / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report["teacher"].items() if k != "history"}))


if __name__ == "__main__":
    main()
