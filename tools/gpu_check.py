"""lopd on a CUDA machine with no model hub: real-vocabulary engines against transformers, in one JSON file.

    tools/gpu_check.sh                 # on a GPU machine (about 8 minutes); tools/results/gpu_check.json
    tools/gpu_check.sh --dry-run       # CPU: tiny shapes, short lengths, same code path (a few minutes)

It builds random-weight Qwen3-architecture models at vocabulary 151,936 (tools/real_scale.py): a student of
Qwen3-0.6B's shape and a teacher of Qwen3-1.7B's, then measures, each side by side in this one run:
  1. rollout: lopd's vLLM engine generating (`LLM.generate`, as `lopd rollout` does) against `transformers.generate`;
  2. scoring: lopd's scorer (`lopd.score.score`, k = 32) against a transformers forward pass + top-k;
  3. tensor parallelism 1 vs 2 for scoring, when two GPUs are visible;
  4. the training memory benchmark (tools/bench_train_memory.py) on this device.
Each step is skipped (and says so) once the time budget is spent.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from real_scale import build_qwen3, synthetic_score_set  # noqa: E402

SHAPES = {  # Qwen3-0.6B and Qwen3-1.7B layer shapes (random weights)
    "student": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072),
    "teacher": dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, intermediate=6144),
}
TINY = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=768)
K = 32


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def rollout_rates(model: Path, prompts: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Generated tokens/s: vLLM (lopd's engine builder) vs transformers.generate, same prompts, no EOS stop."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from lopd.engine import build_llm, shutdown_llm

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 150_000, (prompts, prompt_tokens), generator=g)
    llm, start_s = timed(lambda: build_llm(str(model), engine_args={"enforce_eager": True}))
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=1.0, seed=0)
    outputs, vllm_s = timed(lambda: llm.generate([{"prompt_token_ids": row.tolist()} for row in ids], params,
                                                 use_tqdm=False))
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    shutdown_llm(llm)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
    with torch.no_grad():
        _, hf_s = timed(lambda: hf.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True))
    del hf
    return {"prompts": prompts, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "engine_start_s": start_s,
            "vllm_tokens_per_s": generated / vllm_s, "transformers_tokens_per_s": prompts * new_tokens / hf_s,
            "speedup": (generated / vllm_s) / (prompts * new_tokens / hf_s)}


def scoring_rates(teacher: Path, student: Path, work: Path, rows: int, response_tokens: int, tp: int) -> dict:
    """Scored positions/s: `lopd.score.score` (k = 32) vs a transformers forward + log-softmax + top-k per row."""
    import torch
    from transformers import AutoModelForCausalLM

    from lopd.score import ScoreConfig, score

    cache = synthetic_score_set(work, student, rows=rows, prompt_tokens=64, response_tokens=response_tokens, k=K)
    rollouts = cache.rollouts
    engine_args = {"enforce_eager": True, "tensor_parallel_size": tp}
    result, lopd_s = timed(lambda: score(str(teacher), rollouts, ScoreConfig(k=K), root=work / f"tp{tp}",
                                         quiet=True, engine_args=engine_args))
    out = {"rows": rows, "response_tokens": response_tokens, "tensor_parallel_size": tp,
           "lopd_positions_per_s_incl_start": result.positions / lopd_s,
           "lopd_teacher_seconds": result.teacher_seconds,
           "lopd_positions_per_s": result.positions / max(result.teacher_seconds, 1e-9)}
    if tp == 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        hf = hf.to(device).eval()

        def reference() -> int:
            positions = 0
            with torch.no_grad():
                for i in range(len(rollouts)):
                    seq = torch.tensor(list(rollouts.prompt_ids[i]) + list(rollouts.response_ids[i]), device=device)
                    logp = hf(input_ids=seq[None]).logits[0].float().log_softmax(-1)
                    logp[len(rollouts.prompt_ids[i]) - 1:-1].topk(K, dim=-1)
                    positions += len(rollouts.response_ids[i])
            if device == "cuda":
                torch.cuda.synchronize()
            return positions

        positions, hf_s = timed(reference)
        out["transformers_positions_per_s"] = positions / hf_s
        out["speedup"] = out["lopd_positions_per_s"] / out["transformers_positions_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes and lengths, same code path")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--work", type=Path, default=REPO / "storage" / "bench" / "gpu_check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    t0 = time.perf_counter()
    gpus = torch.cuda.device_count()
    results: dict = {"dry_run": args.dry_run, "gpus": gpus, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "device": torch.cuda.get_device_name(0) if gpus else "cpu", "steps": {}}
    if not gpus and not args.dry_run:
        sys.exit("gpu_check: no CUDA device visible; use --dry-run on a CPU machine")
    shapes = {name: TINY for name in SHAPES} if args.dry_run else SHAPES
    models = {name: build_qwen3(args.work / f"{name}-{'tiny' if args.dry_run else 'real'}", **shape)
              for name, shape in shapes.items()}
    lengths = dict(prompts=4, prompt_tokens=32, new_tokens=16, rows=4, response_tokens=256) if args.dry_run else \
        dict(prompts=64, prompt_tokens=256, new_tokens=256, rows=16, response_tokens=4096)

    def step(name: str, fn) -> None:
        if time.perf_counter() - t0 > args.budget_s:
            results["steps"][name] = {"skipped": "time budget spent"}
        else:
            try:
                results["steps"][name], seconds = timed(fn)
                results["steps"][name]["seconds"] = seconds
            except Exception as err:  # one failed step must not hide the others' numbers
                results["steps"][name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(results["steps"][name]), flush=True)

    step("rollout", lambda: rollout_rates(models["student"], lengths["prompts"], lengths["prompt_tokens"],
                                          lengths["new_tokens"]))
    step("score_tp1", lambda: scoring_rates(models["teacher"], models["student"], args.work, lengths["rows"],
                                            lengths["response_tokens"], 1))
    if gpus >= 2:
        step("score_tp2", lambda: scoring_rates(models["teacher"], models["student"], args.work, lengths["rows"],
                                                lengths["response_tokens"], 2))
    else:
        results["steps"]["score_tp2"] = {"skipped": f"{gpus} GPU(s) visible"}

    def train_memory() -> dict:
        out = args.work / "bench_train_memory.json"
        cmd = [sys.executable, str(TOOLS / "bench_train_memory.py"), "--out", str(out), "--work", str(args.work / "train")]
        subprocess.run(cmd + (["--quick"] if args.dry_run else []), check=True, cwd=REPO)
        return json.loads(out.read_text())["runs"][-1] if out.exists() else {"note": "quick run writes no file"}

    step("train_memory", train_memory)
    results["seconds"] = time.perf_counter() - t0
    target = args.out or TOOLS / "results" / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {target} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
