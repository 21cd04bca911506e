"""Training throughput of `lopd train` per loss on a ~110M Qwen2 from a real teacher cache, and the cache-read share.

    python tools/bench_train.py            # full run (about 5 minutes on 2 CPU cores); writes tools/results/bench_train.json
    python tools/bench_train.py --quick    # seconds-scale smoke run (results not written unless --out)

Set-up: the random-weight Qwen2 of tools/bench_score.py (hidden 768, 12 layers, vocabulary 32,768) is both the student
and the teacher. A rollout set of random token ids (R rows, P prompt + T response tokens) is scored once with the real
scorer (`lopd.score.score`, k=32, float16), then `lopd.train.trainer.train()` (DeepSpeed ZeRO-2 on CPU, AdamW, float32)
runs S optimizer steps per loss from a freshly opened cache (first shard read, checksum and decode included).

How the cache-read wait is measured (trainer.py unchanged): `train()` accepts `batches=`, a callable returning the
micro-batch iterator. The benchmark passes exactly the iterator the trainer builds for a cache,
`offline_batches(SequenceDataset(cache), config, micro, 1, pad_id)` (one micro-batch per step), wrapped so every `next()` is timed. The DataLoader
runs in the training process (no workers), so the time inside `next()` (shard verify/decode, `__getitem__`,
`collate`) is time the training loop waits for data. Share = that time / the trainer's own wall time of the step loop
(`TrainResult.seconds`). As a cross-check the same number of micro-batches is also drawn from `offline_batches` alone
on a fresh cache, without training.

Rates: response tokens (the tokens a loss is computed on) per second and sequence tokens (prompt + response, what the
forward/backward pass processes) per second, over the whole step loop and in steady state (from `metrics.jsonl` with
`log_every=1`: steps 2..S, i.e. without the first step's one-off costs). DeepSpeed set-up and the final checkpoint
save are outside the rates and reported separately.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import (REPO, build_large_model, finish_results, fmt, markdown_table,  # noqa: E402
                         model_parameters, random_rollout_set, start_results)

LOSSES = ["sft", "lightning", "rkl_topk", "gkd", "fkl_topk_tail"]


class TimedStream:
    def __init__(self, it):
        self.it = it
        self.seconds = 0.0
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - start
            self.batches += 1


def make_cache(model_dir: str, work: Path, rows: int, prompt_len: int, response_len: int, k: int) -> tuple[Path, dict]:
    from lopd.cache import open_cache
    from lopd.engine import build_llm, shutdown_llm
    from lopd.score import ScoreConfig, score

    rollouts = random_rollout_set(work / f"train-rollouts-{Path(model_dir).name}-{rows}x{prompt_len}+{response_len}",
                                  model_dir, rows, prompt_len, response_len, seed=1)
    out = work / f"train-scores-{Path(model_dir).name}-{rows}x{prompt_len}+{response_len}-k{k}"
    if (out / "manifest.json").is_file():
        return out, {"reused": True}
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "4"
    start = time.perf_counter()
    llm = build_llm(model_dir, max_logprobs=k)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    result = score(model_dir, rollouts, ScoreConfig(k=k), root=work / "root", out=out, llm=llm, quiet=True)
    seconds = time.perf_counter() - start
    shutdown_llm(llm)
    del llm
    import gc

    gc.collect()
    open_cache(out)
    return out, {"reused": False, "engine_startup_seconds": startup, "score_seconds": seconds,
                 "positions": result.positions}


def steady_rate(metrics_file: Path) -> float | None:
    """Response tokens/s between the end of step 1 and the last step (tokens_per_s is cumulative from the start)."""
    recs = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if len(recs) < 2:
        return None
    t = [r["tokens"] / r["tokens_per_s"] for r in recs]
    return (recs[-1]["tokens"] - recs[0]["tokens"]) / (t[-1] - t[0])


def bench_loss(loss: str, model_dir: str, cache_path: Path, work: Path, batch: int, micro: int, steps: int) -> dict:
    from lopd.cache import open_cache
    from lopd.train.data import SequenceDataset
    from lopd.train.trainer import TrainConfig, offline_batches, train

    cache = open_cache(cache_path)
    config = TrainConfig(loss=loss, lr=1e-5, batch_size=batch, micro_batch_size=micro, steps=steps, log_every=1)
    streams: list[TimedStream] = []

    def batches(_module):
        steps = offline_batches(SequenceDataset(cache), config, micro, 1, pad_id=0)  # one micro-batch per "step"
        stream = TimedStream(batch for step in steps for batch in step)
        streams.append(stream)
        return stream

    out = work / f"train-{loss}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = train(model_dir, cache, config, out, batches=batches, quiet=True, root=work / "root")
    call = time.perf_counter() - start
    stream = streams[0]
    seq_tokens_per_micro = None
    steady = steady_rate(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    return {"loss": loss, "steps": result.steps, "micro_batches": stream.batches, "response_tokens": result.tokens,
            "loop_seconds": result.seconds, "call_seconds": call, "setup_and_save_seconds": call - result.seconds,
            "response_tokens_per_s": result.tokens / result.seconds, "steady_response_tokens_per_s": steady,
            "data_wait_seconds": stream.seconds, "data_wait_share": stream.seconds / result.seconds,
            "final_loss": result.final_metrics.get("loss"), "_seq_tokens_per_micro": seq_tokens_per_micro}


def data_only(cache_path: Path, micro: int, micro_batches: int) -> dict:
    from lopd.cache import open_cache
    from lopd.train.data import SequenceDataset
    from lopd.train.trainer import TrainConfig, offline_batches

    config = TrainConfig(micro_batch_size=micro)
    start = time.perf_counter()
    it = offline_batches(SequenceDataset(open_cache(cache_path)), config, micro, 1, pad_id=0)
    tokens = 0
    for _ in range(micro_batches):
        (batch,) = next(it)
        tokens += batch.num_tokens
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "micro_batches": micro_batches, "response_tokens": tokens,
            "response_tokens_per_s": tokens / seconds}


def markdown(results: dict) -> str:
    s = results["setup"]
    seq_factor = (s["prompt_tokens"] + s["response_tokens"]) / s["response_tokens"]
    headers = ["loss", "steps x batch", "response tok/s", "sequence tok/s", "steady response tok/s",
               "data wait", "data wait share", "DeepSpeed set-up + save"]
    rows = []
    for r in results["losses"]:
        rows.append([r["loss"], f"{r['steps']} x {s['batch_size']}", fmt(r["response_tokens_per_s"]),
                     fmt(r["response_tokens_per_s"] * seq_factor),
                     fmt(r["steady_response_tokens_per_s"]) if r["steady_response_tokens_per_s"] else "-",
                     f"{r['data_wait_seconds']:.3f} s", f"{100 * r['data_wait_share']:.2f}%",
                     f"{r['setup_and_save_seconds']:.1f} s"])
    d = results["data_only"]
    lines = [markdown_table(headers, rows), "",
             f"- Model {results['model']} ({results['parameters'] / 1e6:.1f}M parameters), float32, ZeRO-2, micro-batch "
             f"{s['micro_batch_size']}, {s['rows']} cached rows of {s['prompt_tokens']} prompt + {s['response_tokens']} "
             f"response tokens, k={s['k']}.",
             f"- Data path alone (`offline_batches` on a fresh cache, {d['micro_batches']} micro-batches): "
             f"{d['seconds']:.3f} s, {d['response_tokens_per_s']:,.0f} response tokens/s."]
    c = results["cache"]
    if not c.get("reused"):
        lines.append(f"- Cache built once with `lopd.score.score` (k={s['k']}): {c['positions']:,} positions in "
                     f"{c['score_seconds']:.1f} s (engine start-up {c['engine_startup_seconds']:.1f} s).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON results (default tools/results/bench_train.json; none with --quick)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lopd-bench"))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = start_results()
    if args.quick:
        model = build_large_model(work, dict(hidden=128, layers=2, heads=2, intermediate=256, vocab=4096,
                                             max_positions=256))
        setup = dict(rows=16, prompt_tokens=8, response_tokens=24, k=32, batch_size=4, micro_batch_size=2,
                     steps=args.steps or 3)
        name = "qwen2-small-random"
    else:
        model = build_large_model(work)
        setup = dict(rows=64, prompt_tokens=32, response_tokens=96, k=32, batch_size=8, micro_batch_size=4,
                     steps=args.steps or 3)
        name = "qwen2-110M-random"
    results.update(model=name, model_dir=str(model), parameters=model_parameters(model), setup=setup)
    cache_path, results["cache"] = make_cache(str(model), work, setup["rows"], setup["prompt_tokens"],
                                              setup["response_tokens"], setup["k"])
    print(f"[{time.strftime('%H:%M:%S')}] cache {cache_path} {results['cache']}", flush=True)
    # Warm-up: one step, so DeepSpeed's one-off JIT build of its CPU communication op and first-call costs
    # land outside the measured losses.
    start = time.perf_counter()
    bench_loss("sft", str(model), cache_path, work, setup["batch_size"], setup["micro_batch_size"], 1)
    results["warmup_seconds"] = time.perf_counter() - start
    results["losses"] = []
    for loss in args.losses.split(","):
        r = bench_loss(loss, str(model), cache_path, work, setup["batch_size"], setup["micro_batch_size"],
                       setup["steps"])
        r.pop("_seq_tokens_per_micro")
        results["losses"].append(r)
        print(f"[{time.strftime('%H:%M:%S')}] {loss}: {r['response_tokens_per_s']:,.1f} response tok/s, data wait "
              f"{100 * r['data_wait_share']:.2f}%", flush=True)
    micro_batches = results["losses"][0]["micro_batches"] if results["losses"] else 8
    results["data_only"] = data_only(cache_path, setup["micro_batch_size"], micro_batches)
    finish_results("train", results, markdown(results), t0, args.out, args.quick)


if __name__ == "__main__":
    main()
