"""Rebuild the bundled toy world deterministically: dictionary, tokenizer, teacher and student base.

    python tools/build_toy_models.py              # writes lopd/toy/assets/ (about 12 minutes on 2 CPU cores)
    python tools/build_toy_models.py --world calc # the calculator (tool-use) teacher: assets/calc_teacher
    python tools/build_toy_models.py --world words-b  # a second words teacher (another seed): assets/teacher_b

The teacher (Qwen2, 4 layers, hidden 128, head_dim 32) is trained with plain PyTorch until it completes
most held-out prefixes into valid dictionary words at temperature 1. The student base (Qwen2, 2 layers,
hidden 64, head_dim 32) is left at its seeded random initialisation: the demo's SFT stage teaches it.
The calculator teacher (`--world calc`, same architecture) is trained on reference tool-use traces of
lopd.toy.calc, with the loss on the model's own steps only (never on the tool's observations), until it
solves most held-out expressions with the calculator in the loop at temperature 1.
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
from lopd.toy import calc
from lopd.toy import words as world
from lopd.toy.tokenizer import build_char_tokenizer, save_char_tokenizer

MAX_POSITIONS = 64
PAD_ID = 0  # <pad> of the character tokenizer (lopd.toy.tokenizer.SPECIAL_TOKENS)


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
    return pad_batch(seqs, labels, tok.pad_token_id)


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


def train_loop(model, batch_fn, probe_fn, *, name: str, max_steps: int, target: float, min_steps: int, lr: float,
               warmup: int = 100, every: int = 250) -> dict:
    """AdamW with warm-up and cosine decay on `batch_fn()` (ids, labels) until `probe_fn(model)` reaches `target`.

    `probe_fn` returns (score, extra dict); training stops at the first probe >= target after `min_steps`.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))
    )
    start = time.time()
    history = []
    for step in range(1, max_steps + 1):
        ids, labels = batch_fn()
        loss = model(input_ids=ids, attention_mask=(ids != PAD_ID).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % every == 0 or step == max_steps:
            rate, extra = probe_fn(model)
            history.append({"step": step, "loss": round(loss.item(), 4), "valid": rate, **extra})
            print(f"{name} step {step}: loss {loss.item():.3f} valid@T1 {rate:.3f} {extra} "
                  f"({time.time() - start:.0f}s)", flush=True)
            if rate >= target and step >= min_steps:
                break
    return {"steps": step, "seconds": round(time.time() - start, 1), "history": history}


def train_teacher(tok, dictionary, out_dir: Path, max_steps: int, target: float, seed: int) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Qwen2ForCausalLM(model_config(tok, hidden=128, layers=4, heads=4))
    probe = world.make_prompts("test", 500, dictionary)

    def probe_fn(m):
        rate, distinct = valid_rate(m, tok, probe)
        return rate, {"distinct": distinct}

    report = train_loop(model, lambda: batch_of_sequences(tok, dictionary, rng, 256), probe_fn, name="teacher",
                        max_steps=max_steps, target=target, min_steps=1500, lr=2e-3)
    model.save_pretrained(out_dir, safe_serialization=True)
    return report


def pad_batch(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


def calc_batch(tok, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference tool-use traces; labels cover the student's steps and <eos>, never the tool's observations."""
    seqs, labels = [], []
    for _ in range(size):
        prompt = calc.random_expression(rng)
        ids = tok(prompt)["input_ids"]
        lab = [-100] * len(ids)
        for student, observation in calc.reference_steps(prompt):
            s = tok(student, add_special_tokens=False)["input_ids"]
            o = tok(observation, add_special_tokens=False)["input_ids"] if observation else [tok.eos_token_id]
            ids += s + o
            lab += s + ([-100] * len(o) if observation else o)
        seqs.append(ids)
        labels.append(lab)
    return pad_batch(seqs, labels, tok.pad_token_id)


@torch.no_grad()
def tool_rollouts(model, tok, env, rows: list[dict], temperature: float = 1.0, max_tokens: int = 48) -> list[str]:
    """Sample responses with the tool in the loop (transformers, no KV cache: toy lengths), as decoded text."""
    model.eval()
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    responses: list[list[int]] = [[] for _ in rows]
    calls = [0] * len(rows)
    active = list(range(len(rows)))
    while active:
        seqs = [prompts[i] + responses[i] for i in active]
        width = max(map(len, seqs))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
        attn = (torch.arange(width).unsqueeze(0) >= torch.tensor([width - len(s) for s in seqs]).unsqueeze(1)).long()
        position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1).tolist()
        still = []
        for i, token in zip(active, nxt):
            responses[i].append(token)
            if token == tok.eos_token_id or len(responses[i]) >= max_tokens:
                continue
            text = tok.decode(responses[i], skip_special_tokens=True)
            if calls[i] < env.max_calls and any(text.endswith(s) for s in env.stop):
                observation = env.observe(rows[i], text)
                if observation is None:
                    continue
                calls[i] += 1
                responses[i] += tok(observation, add_special_tokens=False)["input_ids"]
            still.append(i)
        active = still
    model.train()
    return [tok.decode(r, skip_special_tokens=True) for r in responses]


def calc_solve_rate(model, tok, rows: list[dict]) -> tuple[float, dict]:
    texts = tool_rollouts(model, tok, calc.ENVIRONMENT, rows)
    correct = sum(calc.verify(r, t) for r, t in zip(rows, texts))
    rubric = sum(calc.judge(r, t) for r, t in zip(rows, texts)) / len(rows)
    return correct / len(rows), {"rubric": round(rubric, 4)}


def train_calc_teacher(tok, out_dir: Path, max_steps: int, target: float, seed: int, batch: int = 64) -> dict:
    """The calculator world's teacher: same architecture as the words teacher, trained on tool-use traces."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Qwen2ForCausalLM(model_config(tok, hidden=128, layers=4, heads=4))
    probe = [{"prompt": p.prompt} for p in calc.make_prompts("test", 200)]
    report = train_loop(model, lambda: calc_batch(tok, rng, batch), lambda m: calc_solve_rate(m, tok, probe),
                        name="calc teacher", max_steps=max_steps, target=target, min_steps=300, lr=2e-3, every=100)
    model.save_pretrained(out_dir, safe_serialization=True)
    final, extra = calc_solve_rate(model, tok, [{"prompt": p.prompt} for p in calc.make_prompts("eval", 500)])
    report = {"command": f"python tools/build_toy_models.py --world calc --max-steps {max_steps}",
              "max_steps": max_steps, **report, "batch": batch,
              "final_eval": {"prompts": 500, "solved@T1": final, **extra}}
    return report


def save_student_base(tok, out_dir: Path, seed: int) -> None:
    torch.manual_seed(seed)
    Qwen2ForCausalLM(model_config(tok, hidden=64, layers=2, heads=2)).save_pretrained(out_dir, safe_serialization=True)


def finish_model_dir(tok, out_dir: Path) -> None:
    tok.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out_dir)


def update_report(path: Path, entries: dict) -> dict:
    """Merge `entries` into build_report.json, keeping the keys other worlds wrote."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(entries)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def build_words(args) -> None:
    out: Path = args.out
    dictionary = world.make_dictionary(args.dictionary_size)
    (out / "words.txt").write_text("\n".join(dictionary) + "\n")
    tok = save_char_tokenizer(out / "tokenizer")

    for name in ("teacher", "student_base"):
        shutil.rmtree(out / name, ignore_errors=True)
    report = {"dictionary_size": len(dictionary)}
    report["teacher"] = train_teacher(tok, dictionary, out / "teacher", args.max_steps or 4000, args.target or 0.95,
                                      args.seed)
    save_student_base(tok, out / "student_base", args.seed + 1)
    for name in ("teacher", "student_base"):
        finish_model_dir(tok, out / name)
    update_report(out / "build_report.json", report)
    print(json.dumps({k: v for k, v in report["teacher"].items() if k != "history"}))


def build_teacher_b(args) -> None:
    """A second words teacher for the teacher-consistency experiment (arXiv 2604.13010's claim that OPD from a
    teacher other than the SFT data's is worse): same dictionary, tokenizer, architecture, steps and target as
    `teacher`, another seed (--seed + 1), so the two are of equal quality and differ only in what they learned."""
    out: Path = args.out
    dictionary = (out / "words.txt").read_text().split()
    tok = build_char_tokenizer()
    shutil.rmtree(out / "teacher_b", ignore_errors=True)
    report = train_teacher(tok, dictionary, out / "teacher_b", args.max_steps or 4000, args.target or 0.95,
                           args.seed + 1)
    finish_model_dir(tok, out / "teacher_b")
    update_report(out / "build_report.json", {"teacher_b": report})
    print(json.dumps({k: v for k, v in report.items() if k != "history"}))


def build_calc(args) -> None:
    """The calculator world's teacher only: it shares the tokenizer and the student base with the words world."""
    out: Path = args.out
    tok = build_char_tokenizer()
    shutil.rmtree(out / "calc_teacher", ignore_errors=True)
    report = train_calc_teacher(tok, out / "calc_teacher", args.max_steps or 700, args.target or 0.9, args.seed)
    finish_model_dir(tok, out / "calc_teacher")
    update_report(out / "build_report.json", {"calc_teacher": report})
    print(json.dumps({k: v for k, v in report.items() if k != "history"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=["words", "words-b", "calc"], default="words",
                    help="words: dictionary, tokenizer, teacher and student base; words-b: a second words teacher "
                         "(teacher_b, seed --seed + 1) for the teacher-consistency experiment; calc: the calculator "
                         "teacher")
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--dictionary-size", type=int, default=800)
    ap.add_argument("--max-steps", type=int, default=None, help="default 4000 (words), 700 (calc; the cosine schedule spans it)")
    ap.add_argument("--target", type=float, default=None,
                    help="stop once the probe score at T=1 reaches this (default 0.95 words valid, 0.9 calc solved)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    {"words": build_words, "words-b": build_teacher_b, "calc": build_calc}[args.world](args)


if __name__ == "__main__":
    main()
