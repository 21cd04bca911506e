"""Rollout throughput: vLLM (lopd.rollout and the raw engine) against transformers.generate.

    python tools/bench_rollout.py          # full run (about 5 minutes on 2 CPU cores); writes tools/results/bench_rollout.json
    python tools/bench_rollout.py --quick  # seconds-scale smoke run (results not written unless --out)

Per model (toy student base, toy teacher, and the random-weight ~110M Qwen2 of tools/bench_score.py), same prompts
(P token ids each), same sampling (temperature 1, top_p 1, top-k off, n samples per prompt):
- "fixed length" (the speed comparison): every request generates exactly T new tokens.
    vLLM raw engine: `LLM.generate(SamplingParams(n, temperature=1, min_tokens=T, max_tokens=T, ignore_eos=True,
      logprobs=0, flat_logprobs=True))`, one call over all prompts.
    transformers: `model.generate(do_sample=True, temperature=1, top_k=0, top_p=1, min_new_tokens=T,
      max_new_tokens=T, num_return_sequences=n)` in batches of B prompts (all prompts have the same length: no
      padding), float32, inference_mode.
- "lopd.rollout" (lopd's overhead on the same engine): `lopd.rollout.rollout()` end to end (prompt ids given, per
  request seeded params, one engine call, behaviour log-probs, decode, Parquet write) against the raw engine called
  with exactly the parameters lopd builds (`max_tokens=T`, EOS allowed, seeded copies). Tokens/s counts the tokens
  actually generated, so a model that stops at EOS is compared on equal work.
Engine start-up is reported separately; every timed call follows a warm-up call.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import (REPO, build_large_model, finish_results, fmt, markdown_table,  # noqa: E402
                         model_parameters, start_results)


def prompts_for(vocab: int, n: int, length: int, seed: int = 0, low: int = 4) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, length).tolist() for _ in range(n)]


def transformers_generate(model_dir: str, prompts: list[list[int]], n: int, new_tokens: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id or 0

    def run(chunk):
        ids = torch.tensor(chunk)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                             num_return_sequences=n, pad_token_id=pad)
        return out[:, ids.shape[1]:]

    with torch.inference_mode():
        torch.manual_seed(0)
        run(prompts[: min(2, len(prompts))])  # warm-up
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch):
            generated += run(prompts[i : i + batch]).numel()
        seconds = time.perf_counter() - start
    del model
    gc.collect()
    return {"seconds": seconds, "tokens": generated}


def vllm_runs(model_dir: str, prompts: list[list[int]], n: int, new_tokens: int, work: Path, kv_gib: int) -> dict:
    from vllm import SamplingParams

    from lopd.engine import build_llm, shutdown_llm
    from lopd.fingerprint import model_fingerprint
    from lopd.rollout import SamplingConfig, rollout, seeded

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    start = time.perf_counter()
    llm = build_llm(model_dir, seed=0)
    startup = time.perf_counter() - start
    model_fingerprint(model_dir)  # memoised weight hash, a one-off of the first rollout() call
    requests = [{"prompt_token_ids": p} for p in prompts]
    out = {"startup_seconds": startup}
    try:
        fixed = SamplingParams(n=n, temperature=1.0, top_p=1.0, min_tokens=new_tokens, max_tokens=new_tokens,
                               ignore_eos=True, logprobs=0, flat_logprobs=True)
        llm.generate(requests[:4], fixed, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        res = llm.generate(requests, fixed, use_tqdm=False)
        out["fixed"] = {"seconds": time.perf_counter() - start,
                        "tokens": sum(len(c.token_ids) for r in res for c in r.outputs)}

        # lopd.rollout and the raw engine with exactly the parameters lopd builds (EOS allowed).
        sampling = SamplingConfig(n=n, temperature=1.0, top_p=1.0, max_tokens=new_tokens, seed=0)
        params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=new_tokens, logprobs=0, flat_logprobs=True)
        start = time.perf_counter()
        res = llm.generate(requests, seeded(params, sampling.seed, len(requests)), use_tqdm=False)
        out["raw_lopd_params"] = {"seconds": time.perf_counter() - start,
                                  "tokens": sum(len(c.token_ids) for r in res for c in r.outputs)}
        rows = [{"id": f"p{i}", "prompt": "", "prompt_ids": p} for i, p in enumerate(prompts)]
        target = work / f"rollout-{Path(model_dir).name}"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        rset, reused = rollout(model_dir, rows, sampling, root=work / "root", out=target, llm=llm, quiet=True)
        seconds = time.perf_counter() - start
        assert not reused
        out["lopd_rollout"] = {"seconds": seconds, "tokens": int(sum(len(r) for r in rset.response_ids))}
        shutil.rmtree(target, ignore_errors=True)
    finally:
        shutdown_llm(llm)
        del llm
        gc.collect()
    return out


def bench_model(name: str, model_dir: str, vocab: int, n_prompts: int, n: int, prompt_len: int, new_tokens: int,
                hf_batch: int, work: Path, kv_gib: int) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {n_prompts} prompts x n={n}, {prompt_len} prompt tokens, "
          f"{new_tokens} new tokens", flush=True)
    prompts = prompts_for(vocab, n_prompts, prompt_len)
    hf = transformers_generate(model_dir, prompts, n, new_tokens, hf_batch)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: transformers {hf['tokens'] / hf['seconds']:,.0f} tok/s", flush=True)
    vl = vllm_runs(model_dir, prompts, n, new_tokens, work, kv_gib)
    rate = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    row = {
        "model": name, "parameters": model_parameters(Path(model_dir)), "prompts": n_prompts, "n": n,
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "transformers_batch_prompts": hf_batch,
        "engine_startup_seconds": vl["startup_seconds"],
        "vllm_fixed_tokens_per_s": rate(vl["fixed"]), "transformers_fixed_tokens_per_s": rate(hf),
        "speedup_vllm_vs_transformers": rate(vl["fixed"]) / rate(hf),
        "raw_lopd_params_tokens_per_s": rate(vl["raw_lopd_params"]),
        "lopd_rollout_tokens_per_s": rate(vl["lopd_rollout"]),
        "lopd_rollout_vs_transformers": rate(vl["lopd_rollout"]) / rate(hf),
        "lopd_overhead_share": 1 - (vl["raw_lopd_params"]["seconds"] / vl["raw_lopd_params"]["tokens"])
        / (vl["lopd_rollout"]["seconds"] / vl["lopd_rollout"]["tokens"]),
        "raw": {"transformers": hf, **{k: v for k, v in vl.items() if k != "startup_seconds"}},
    }
    print(f"  vLLM fixed {row['vllm_fixed_tokens_per_s']:,.0f} tok/s ({row['speedup_vllm_vs_transformers']:.2f}x), "
          f"lopd.rollout {row['lopd_rollout_tokens_per_s']:,.0f} tok/s, raw engine same params "
          f"{row['raw_lopd_params_tokens_per_s']:,.0f}", flush=True)
    return row


def markdown(results: dict) -> str:
    headers = ["model", "prompts x n", "new tokens", "vLLM engine tok/s (fixed length)",
               "transformers.generate tok/s (fixed length)", "vLLM / transformers", "lopd.rollout tok/s (EOS allowed)",
               "raw engine, lopd's params tok/s", "lopd.rollout / transformers", "lopd overhead"]
    rows = []
    for r in results["models"]:
        rows.append([f"{r['model']} ({r['parameters'] / 1e6:.2f}M)", f"{r['prompts']} x {r['n']}", r["new_tokens"],
                     fmt(r["vllm_fixed_tokens_per_s"]), fmt(r["transformers_fixed_tokens_per_s"]),
                     f"{r['speedup_vllm_vs_transformers']:.2f}x", fmt(r["lopd_rollout_tokens_per_s"]),
                     fmt(r["raw_lopd_params_tokens_per_s"]), f"{r['lopd_rollout_vs_transformers']:.2f}x",
                     f"{100 * r['lopd_overhead_share']:.1f}%"])
    lines = [markdown_table(headers, rows), ""]
    for r in results["models"]:
        lines.append(f"- {r['model']}: prompts of {r['prompt_tokens']} random token ids; transformers batches of "
                     f"{r['transformers_batch_prompts']} prompts; vLLM engine start-up {r['engine_startup_seconds']:.1f} s "
                     f"(not in the rates).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON results (default tools/results/bench_rollout.json; none with --quick)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lopd-bench"))
    parser.add_argument("--models", default="student,teacher,large")
    parser.add_argument("--append", action="store_true", help="keep the runs already in the JSON file")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = start_results(models=[])
    if args.quick:
        large = build_large_model(work, dict(hidden=128, layers=2, heads=2, intermediate=256, vocab=4096,
                                             max_positions=256))
        toy_sizes, large_sizes = (8, 2, 8, 16, 8), (4, 1, 16, 16, 4)
        large_name = "qwen2-small-random"
    else:
        large = build_large_model(work)
        # (prompts, n, prompt tokens, new tokens, transformers batch prompts)
        toy_sizes, large_sizes = (128, 4, 8, 48, 128), (32, 1, 32, 128, 32)
        large_name = "qwen2-110M-random"
    plan = {"student": ("toy student base", str(STUDENT_BASE_DIR), 64, toy_sizes, 1),
            "teacher": ("toy teacher", str(TEACHER_DIR), 64, toy_sizes, 1),
            "large": (large_name, str(large), int(__import__("json").loads((Path(large) / "config.json").read_text())
                                                   ["vocab_size"]), large_sizes, 4)}
    for key in args.models.split(","):
        name, path, vocab, sizes, kv = plan[key]
        results["models"].append(bench_model(name, path, vocab, *sizes, work=work, kv_gib=kv))
    finish_results("rollout", results, markdown(results), t0, args.out, args.quick, args.append)


if __name__ == "__main__":
    main()
