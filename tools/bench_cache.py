"""Teacher-cache format benchmark: bytes per position, log-prob error and read rates (issue items 3 and 4).

    python tools/bench_cache.py            # ~2 minutes on 2 CPU cores; writes tools/results/bench_cache.json,
                                           # tools/results/bench_cache.md and the "Cache format" section of BENCHMARKS.md
    python tools/bench_cache.py --quick    # a smaller run for a smoke test (results not written unless --out)

What is measured
- Bytes per response position on disk at k=32 for five layouts, two vocabularies (151,936 = Qwen2/2.5/3,
  65,536) and three id distributions (below; naive, parquet and lopd-f32 on the realistic one only):
    naive        float32 log-probs + int64 ids, raw .npy files (no compression)
    parquet      one row per sequence, list columns (`lopd cache export` schema: list<float32>,
                 list<list<int64>>, list<list<float32>>), zstd
    lopd-plain   the first version-1 shard layout: the logical arrays as-is (float16, narrowest uint ids),
                 blosc(zstd 5, byte shuffle) = `write_shard(encode=False, codec=Codec(clevel=3, blocksize=0))`
    lopd         the shipped layout (`write_shard` defaults): id table + codes, order-key rank deltas, sampled rank
    lopd-f32     the same with `--logprob-dtype float32`
- The log-prob error of every layout against the float64 truth (top-k, sampled, tail), overall and over values
  >= -32 (float16 spacing <= 2^-6 there); token ids must round-trip exactly (checked).
- A codec sweep of the shipped transforms (blosc clevel x blocksize, rank- vs position-major log-prob deltas):
  size, write and decode speed.
- Read rates through the real reader on a score set written with the real writer protocol:
  raw shard decode (`read_shard`), checksum verification, `open_cache` + `cache[i]` for every i (first pass =
  decode + verify + access; second pass = per-sequence access only), and the trainer's path
  (`SequenceDataset` + `collate`, shuffled order, batches of 8). Each is timed best of 3, in wall-clock time and
  in process CPU time (all threads; robust to other jobs on the shared cores).
  Files are read from the local disk right after being written, i.e. mostly from the page cache.

Synthetic data (documented so the numbers can be judged)
- Response lengths: uniform in [16, 1008] tokens (mean 512); 1,024 rows per shard (`lopd score` default), so a shard
  holds ~0.5M positions (539,391 with the fixed seed).
- Teacher log-probs: per position, logits z_i = beta * (b_i + G_i) with a Zipfian base b_i and Gumbel noise G_i,
  sharpness beta ~ U(1.5, 5). The top values of a Gumbel process over a large vocabulary are
  ln Z - ln Gamma_j with Gamma_j the arrival times of a unit-rate Poisson process (exact in the large-vocabulary
  limit, where the values are also independent of which ids win), so the top 64 are drawn that way; ranks
  beyond 64 are added in expectation (sum_{j>64} j^-beta) and a background mass
  e^u, u ~ U(-9, -3), stands for the rest of the vocabulary. log_softmax in float64; top-32 kept, sorted
  descending; tail = log(1 - sum exp(top-k)) (floor log 1e-12) as `lopd score` computes it.
  Resulting statistics are printed and stored ("data"): top-1 median ~ -0.2 (69% > -0.5), rank-32 median ~ -12
  (10%..90%: -21..-7), tail median ~ -5.
- Token ids ("zipf"): the Gumbel-top-k order of a Zipfian base is sequential sampling without replacement from
  it, so the k ids of a position are drawn that way from p(rank r) = ln((r+2)/(r+1)) / ln(V+1) (Zipf, exponent 1):
  frequent tokens recur across positions. Frequency rank -> token id follows a BPE-like order: ids sorted by
  ln(rank) + N(0, 1) (frequent tokens tend to have small ids). "zipf-shuffled": the same draws with a random
  rank -> id permutation (no id/frequency correlation). "uniform": k distinct ids uniform over the vocabulary,
  the worst case.
- Sampled token (the student's): drawn from the teacher's top-k probabilities ^0.8 plus the tail bucket
  (~2.5% of positions fall outside the top-k; their log-prob is rank-32's minus Exp(2)).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lopd.cache.layout import (  # noqa: E402
    Codec, id_dtype, read_shard, read_stored, shard_bytes, shard_checksum, write_shard,
)

K = 32
VOCABS = (151_936, 65_536)
ID_MODELS = ("zipf", "zipf-shuffled", "uniform")
LOGPROB_FLOOR = -1e4  # as lopd.score
FP16_EXACT_BELOW = -32.0  # float16 spacing is 2^-5 below -32, so rounding error can exceed 1e-2 there
SECTION = "## Cache format (tools/bench_cache.py)"


# ---- synthetic teacher signal ---------------------------------------------------------------------------------

def zipf_ranks(rng, n: int, k: int, vocab: int, draws: int = 48) -> np.ndarray:
    """n rows of k distinct frequency ranks; a row is sequential sampling without replacement from
    p(r) = ln((r+2)/(r+1)) / ln(V+1): draw with replacement, keep first occurrences in draw order."""
    out = np.empty((n, k), np.int64)
    todo = np.arange(n)
    log_v = np.log(vocab + 1.0)
    cols = np.arange(draws)
    while len(todo):
        m = len(todo)
        d = np.minimum((np.exp(rng.random((m, draws)) * log_v) - 1).astype(np.int64), vocab - 1)
        key = np.sort(d * draws + cols, axis=1)  # by value, then by draw order
        value = key // draws
        first = np.ones(key.shape, bool)
        first[:, 1:] = value[:, 1:] != value[:, :-1]
        keep = np.zeros((m, draws), bool)
        keep[np.broadcast_to(np.arange(m)[:, None], key.shape)[first], (key % draws)[first]] = True
        seen = np.cumsum(keep, axis=1)
        ok = seen[:, -1] >= k
        out[todo[ok]] = d[ok][(keep & (seen <= k))[ok]].reshape(-1, k)
        todo = todo[~ok]
    return out


def uniform_ids(rng, n: int, k: int, vocab: int) -> np.ndarray:
    out = np.empty((n, k), np.int64)
    todo = np.arange(n)
    while len(todo):
        d = rng.integers(0, vocab, (len(todo), k))
        s = np.sort(d, axis=1)
        ok = (s[:, 1:] != s[:, :-1]).all(axis=1)
        out[todo[ok]] = d[ok]
        todo = todo[~ok]
    return out


def teacher_logprobs(rng, n: int, k: int, ext: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 truth: top-k log-probs [n, k] (descending), tail log-mass [n], sampled-token log-prob [n]."""
    beta = rng.uniform(1.5, 5.0, n)
    gamma = np.cumsum(rng.exponential(size=(n, ext)), axis=1)
    logits = -beta[:, None] * np.log(gamma)
    beyond = (ext + 0.5) ** (1 - beta) / (beta - 1)  # E sum_{j>ext} Gamma_j^-beta ~ sum_{j>ext} j^-beta
    top1 = logits[:, 0]
    lse = top1 + np.log(np.exp(logits - top1[:, None]).sum(1) + beyond * np.exp(-top1))
    lse -= np.log1p(-np.exp(rng.uniform(-9, -3, n)))  # background mass of the rest of the vocabulary
    top = logits[:, :k] - lse[:, None]
    tail = np.log(np.clip(1.0 - np.exp(top).sum(1), 1e-12, 1.0))
    weights = np.exp(np.concatenate([top, tail[:, None]], axis=1) * 0.8)
    weights /= weights.sum(1, keepdims=True)
    pick = (weights.cumsum(1) < rng.random((n, 1))).sum(1).clip(max=k)
    outside = pick == k
    sampled = np.where(outside, top[:, -1] - rng.exponential(2.0, n), top[np.arange(n), np.minimum(pick, k - 1)])
    return top, tail, sampled


def make_truth(seed: int, rows: int, vocab: int) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 1009, rows)
    n = int(lengths.sum())
    top, tail, sampled = teacher_logprobs(rng, n, K)
    ranks = zipf_ranks(rng, n, K, vocab)
    bpe_order = np.argsort(np.argsort(np.log(np.arange(1, vocab + 1)) + rng.normal(0, 1, vocab), kind="stable"))
    ids = {"zipf": bpe_order[ranks], "zipf-shuffled": rng.permutation(vocab)[ranks],
           "uniform": uniform_ids(rng, n, K, vocab)}
    return {"vocab": vocab, "lengths": lengths, "top": top, "tail": tail, "sampled": sampled, "ids": ids}


def logical_arrays(truth: dict, id_model: str, logprob_dtype: str) -> dict[str, np.ndarray]:
    """What `lopd score` hands to the writer."""
    store = lambda x: np.maximum(x, LOGPROB_FLOOR).astype(logprob_dtype)  # noqa: E731
    return {"offsets": np.concatenate([[0], np.cumsum(truth["lengths"])]).astype(np.int64),
            "sampled_logprob": store(truth["sampled"]),
            "topk_ids": truth["ids"][id_model].astype(id_dtype(truth["vocab"])),
            "topk_logprobs": store(truth["top"]), "tail_logprob": store(truth["tail"])}


def data_stats(truth: dict) -> dict:
    top, tail = truth["top"], truth["tail"]
    pct = lambda x: [round(float(v), 2) for v in np.percentile(x, [10, 50, 90])]  # noqa: E731
    return {"positions": int(len(top)), "top1_p10_p50_p90": pct(top[:, 0]),
            "top1_above_-0.5": round(float((top[:, 0] > -0.5).mean()), 3),
            "rank32_p10_p50_p90": pct(top[:, -1]), "tail_p10_p50_p90": pct(tail),
            "topk_below_-32": round(float((top < FP16_EXACT_BELOW).mean()), 5),
            "sampled_outside_topk": round(float((truth["sampled"] < top[:, -1]).mean()), 4),
            "distinct_ids_zipf": int(len(np.unique(truth["ids"]["zipf"])))}


# ---- layouts ---------------------------------------------------------------------------------------------------

def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_naive(path: Path, arrays: dict) -> None:
    path.mkdir(parents=True)
    for name, data in arrays.items():
        dtype = np.int64 if data.dtype.kind in "iu" else np.float32
        np.save(path / f"{name}.npy", data.astype(dtype))


def read_naive(path: Path) -> dict:
    return {p.stem: np.load(p) for p in path.glob("*.npy")}


def write_parquet(path: Path, arrays: dict) -> None:
    path.mkdir(parents=True)
    offsets = arrays["offsets"]
    lists = lambda flat: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)  # noqa: E731
    per_pos = lambda x, t: lists(pa.array(x.astype(t)))  # noqa: E731
    per_rank = lambda x, t: lists(pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(t)), K))  # noqa: E731
    table = pa.table({"teacher_logprobs": per_pos(arrays["sampled_logprob"], np.float32),
                      "topk_ids": per_rank(arrays["topk_ids"], np.int64),
                      "topk_logprobs": per_rank(arrays["topk_logprobs"], np.float32),
                      "tail_logprob": per_pos(arrays["tail_logprob"], np.float32)})
    pq.write_table(table, path / "scores.parquet", compression="zstd")


def read_parquet(path: Path) -> dict:
    table = pq.read_table(path / "scores.parquet")
    flat = lambda name: table.column(name).combine_chunks().flatten()  # noqa: E731
    offsets = table.column("teacher_logprobs").combine_chunks().offsets.to_numpy().astype(np.int64)
    return {"offsets": offsets, "sampled_logprob": flat("teacher_logprobs").to_numpy(),
            "topk_ids": flat("topk_ids").flatten().to_numpy().reshape(-1, K),
            "topk_logprobs": flat("topk_logprobs").flatten().to_numpy().reshape(-1, K),
            "tail_logprob": flat("tail_logprob").to_numpy()}


LAYOUTS = {
    "naive": ("float32", write_naive, read_naive),
    "parquet": ("float32", write_parquet, read_parquet),
    "lopd-plain": ("float16", lambda p, a: write_shard(p, a, encode=False, codec=Codec(clevel=3, blocksize=0)), read_shard),
    "lopd": ("float16", write_shard, read_shard),
    "lopd-f32": ("float32", write_shard, read_shard),
}


def errors(back: dict, truth: dict) -> dict:
    out = {}
    for name, key in (("topk", "topk_logprobs"), ("sampled", "sampled_logprob"), ("tail", "tail_logprob")):
        ref = truth[{"topk": "top", "sampled": "sampled", "tail": "tail"}[name]]
        got = back[key].astype(np.float64)
        err = np.abs(got - np.maximum(ref, LOGPROB_FLOOR))
        out[name] = float(err.max())
        out[name + "_above_-32"] = float(err[ref >= FP16_EXACT_BELOW].max())
    out["max"] = max(out[n] for n in ("topk", "sampled", "tail"))
    out["max_above_-32"] = max(out[n + "_above_-32"] for n in ("topk", "sampled", "tail"))
    return out


def measure_layout(tmp: Path, layout: str, truth: dict, id_model: str) -> dict:
    dtype, write, read = LAYOUTS[layout]
    arrays = logical_arrays(truth, id_model, dtype)
    positions = len(arrays["sampled_logprob"])
    path = tmp / f"{layout}-{truth['vocab']}-{id_model}"
    t0 = time.perf_counter()
    write(path, arrays)
    t1 = time.perf_counter()
    back = read(path)
    decode = min(time.perf_counter() - t1, best_of(1, lambda: read(path)))
    if not np.array_equal(back["topk_ids"].astype(np.int64), truth["ids"][id_model]):
        raise AssertionError(f"{layout}: token ids did not round-trip")
    if not np.array_equal(back["offsets"], arrays["offsets"]):
        raise AssertionError(f"{layout}: offsets did not round-trip")
    size = dir_bytes(path)
    shutil.rmtree(path)
    return {"layout": layout, "vocab": truth["vocab"], "ids": id_model, "logprob_dtype": dtype,
            "positions": positions, "bytes": size, "bytes_per_position": round(size / positions, 2),
            "write_positions_per_s": round(positions / (t1 - t0)), "read_positions_per_s": round(positions / decode),
            "error": errors(back, truth)}


SWEEP = [Codec(3, 0), Codec(3, 1 << 20), Codec(5, 0), Codec(5, 1 << 20), Codec(7, 1 << 20),
         Codec(5, 1 << 20, rank_major=False)]


def codec_sweep(tmp: Path, truth: dict, codecs=SWEEP) -> list[dict]:
    arrays = logical_arrays(truth, "zipf", "float16")
    positions = len(arrays["sampled_logprob"])
    rows = []
    for codec in codecs:
        path = tmp / f"sweep-{codec.clevel}-{codec.blocksize}-{codec.rank_major}"
        t0 = time.perf_counter()
        write_shard(path, arrays, codec=codec)
        t1 = time.perf_counter()
        decode = best_of(2, lambda: read_shard(path))
        rows.append({"clevel": codec.clevel, "zstd_level": 22 if codec.clevel == 9 else 2 * codec.clevel - 1,
                     "blocksize": codec.blocksize or "auto", "rank_major_deltas": codec.rank_major,
                     "default": codec == Codec(), "bytes_per_position": round(shard_bytes(path) / positions, 2),
                     "write_positions_per_s": round(positions / (t1 - t0)),
                     "read_positions_per_s": round(positions / decode)})
        shutil.rmtree(path)
    return rows


def array_breakdown(tmp: Path, truth: dict) -> dict:
    """Bytes per position of each stored array of the shipped layout (realistic data)."""
    arrays = logical_arrays(truth, "zipf", "float16")
    positions = len(arrays["sampled_logprob"])
    path = tmp / "breakdown"
    write_shard(path, arrays)
    stored = read_stored(path)
    out = {name: {"dtype": str(stored[name].dtype), "shape": list(stored[name].shape),
                  "bytes_per_position": round(dir_bytes(path / name) / positions, 2)} for name in sorted(stored)}
    out["(group metadata)"] = {"bytes_per_position": round((path / "zarr.json").stat().st_size / positions, 3)}
    shutil.rmtree(path)
    return out


# ---- read rates through the real reader ------------------------------------------------------------------------

def build_score_set(tmp: Path, truth: dict, shards: int) -> tuple[Path, int]:
    """A complete score set (real writer protocol) of `shards` copies of one 1,024-row shard, plus its rollout set."""
    from lopd.cache.score_set import ScoreSetWriter
    from lopd.rollout_set import write_rollout_set

    arrays = logical_arrays(truth, "zipf", "float16")
    lengths = truth["lengths"]
    rows_per_shard = len(lengths)
    rng = np.random.default_rng(5)
    records = []
    for i in range(rows_per_shard * shards):
        n = int(lengths[i % rows_per_shard])
        records.append({"prompt_id": f"p{i // 4}", "group_id": i // 4, "sample_index": i % 4, "prompt": "q",
                        "answer": "a", "prompt_ids": rng.integers(0, 1000, 64).tolist(),
                        "response_ids": rng.integers(0, truth["vocab"], n).tolist(),
                        "behaviour_logprobs": np.zeros(n, np.float32).tolist(), "finish_reason": "stop", "reward": 1.0})
    rollouts = write_rollout_set(tmp / "rollouts" / "r-bench", records, {"id": "r-bench"})
    path = tmp / "scores" / "s-bench"
    header = {"id": "s-bench", "kind": "score_set", "rollout_set": {"id": rollouts.id, "path": "../../rollouts/r-bench"},
              "config": {"k": K, "logprob_dtype": "float16"}, "vocab_size": truth["vocab"]}
    writer = ScoreSetWriter(path, header, rows_per_shard=rows_per_shard)
    for plan in writer.plan(len(records)):
        with writer.claim(plan) as mine:
            assert mine
            writer.commit(plan, arrays)
    assert writer.finish(len(records))["complete"]
    return path, int(lengths.sum()) * shards


def best_of(repeats: int, fn) -> float:
    """Shortest wall time of `repeats` calls: the machine is shared, so the minimum is the least disturbed."""
    return timed(repeats, fn)[0]


def timed(repeats: int, fn) -> tuple[float, float]:
    """(shortest wall time, shortest process CPU time, all threads) of `repeats` calls. CPU time hardly moves
    when other jobs compete for the cores; wall time does."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


READ_PATHS = {
    "raw_decode": "raw shard decode (`read_shard`)",
    "checksum": "checksum verification (`shard_checksum`)",
    "cache_first_pass": "`open_cache` + `cache[i]` for all i, first pass (verify + decode + access)",
    "cache_warm": "`cache[i]` for all i, shards already decoded (per-sequence access)",
    "trainer_first_epoch": "`SequenceDataset` + `collate`, shuffled, first epoch (verify + decode + access + collate)",
    "trainer_later_epochs": "`SequenceDataset` + `collate`, later epochs (access + collate)",
}


def read_rates(tmp: Path, truth: dict, shards: int, batch: int = 8, repeats: int = 3) -> dict:
    from lopd.cache.reader import open_cache
    from lopd.train.data import SequenceDataset, collate

    path, positions = build_score_set(tmp, truth, shards)
    shard_dirs = sorted((path / "shards").iterdir())
    open_cache(path).rollouts.response_ids  # warm the Parquet file in the page cache like the shards
    n = len(open_cache(path))
    order = np.random.default_rng(0).permutation(n).tolist()

    def first_pass():  # open, verify + decode every shard on first touch, access every sequence
        cache = open_cache(path)
        for i in range(n):
            cache[i]

    def epoch(dataset):
        for start in range(0, n, batch):
            collate([dataset[i] for i in order[start:start + batch]], pad_id=0)

    cache = open_cache(path)
    access_all = lambda: [cache[i] for i in range(n)]  # noqa: E731
    access_all()
    dataset = SequenceDataset(cache)
    runs = {
        "raw_decode": lambda: [read_shard(d) for d in shard_dirs],
        "checksum": lambda: [shard_checksum(d) for d in shard_dirs],
        "cache_first_pass": first_pass,
        "cache_warm": access_all,
        "trainer_first_epoch": lambda: epoch(SequenceDataset(open_cache(path))),
        "trainer_later_epochs": lambda: epoch(dataset),
    }
    out = {"sequences": n, "positions": positions, "shards": len(shard_dirs), "batch": batch, "best_of": repeats,
           "mean_response_tokens": round(positions / n, 1)}
    for name, fn in runs.items():
        wall, cpu = timed(repeats, fn)
        out[f"{name}_positions_per_s"] = round(positions / wall)
        out[f"{name}_positions_per_cpu_s"] = round(positions / cpu)
        if name == "cache_warm":
            out["cache_warm_sequences_per_s"] = round(n / wall)
    shutil.rmtree(path.parent.parent)
    return out


# ---- report ----------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = "GPU: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    import zarr
    import numcodecs
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; Python {platform.python_version()}, numpy {np.__version__}, "
            f"zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, pyarrow {pa.__version__}")


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M/s" if x >= 1e5 else f"{x / 1e3:.0f} k/s"


def summary_line(s: dict) -> str:
    sizes = ", ".join(f"{s[key]:.1f} B ({int(key.rsplit('_', 1)[1]):,}-token vocabulary)"
                      for key in s if key.startswith("lopd_bytes_per_position_"))
    return (f"**Summary** (realistic data, `lopd` layout, float16): {sizes} per position at k={K}; log-prob error "
            f"≤ {s['max_logprob_error_at_or_above_-32']:.4f} nats for values ≥ -32, {s['max_logprob_error_all']:.3f} "
            f"over all values (float16 rounding of values below -32); top-{K} positions read per second (wall / per "
            f"CPU-second): raw shard decode {fmt_rate(s['raw_decode_positions_per_s'])} / "
            f"{fmt_rate(s['raw_decode_positions_per_cpu_s'])}, trainer path (`SequenceDataset` + `collate`, first "
            f"epoch, decode included) {fmt_rate(s['trainer_first_epoch_positions_per_s'])} / "
            f"{fmt_rate(s['trainer_first_epoch_positions_per_cpu_s'])}.")


def markdown(results: dict) -> str:
    lines = [SECTION, "",
             f"Machine: {results['machine']}. Command: `{results['command']}` "
             f"({results['seconds']:.0f} s; 1-minute load average {results['load_average_start_end'][0]} at the start, "
             f"{results['load_average_start_end'][1]} at the end: the machine is shared, rates are best of "
             f"{results['read']['best_of']} (read rates) or 2 (decode), writes single runs). Raw numbers: "
             "`tools/results/bench_cache.json`; data generator and method: the docstring of `tools/bench_cache.py`.",
             "",
             f"Top-k = {K}; one shard of {results['rows_per_shard']} rows, {results['sizes'][0]['positions']:,} "
             "response positions (lengths uniform 16..1008). Bytes per position include every file "
             "(offsets, metadata, id table). Error = max |stored - float64 truth| over top-k, sampled and tail "
             "log-probs; \"≥-32\" restricts to values ≥ -32 (float16 spacing there ≤ 2^-6).", "",
             summary_line(results["summary"]), "",
             "Layouts: `naive` float32 log-probs + int64 ids as raw .npy; `parquet` one row per sequence, list "
             "columns (`lopd cache export` schema), zstd; `lopd-plain` the logical arrays as-is (float16, narrowest "
             "uint ids; the first version-1 writer); `lopd` the shipped encoding (docs/cache-format.md); `lopd-f32` the "
             "same with `--logprob-dtype float32`. Ids: `zipf` realistic (BPE-like id order), `zipf-shuffled` same "
             "draws with ids unrelated to frequency, `uniform` worst case. Write/decode rates of this table are "
             "single shards on a shared machine: indicative only.", "",
             "| layout | vocab | ids | B/position | max error | max error ≥-32 | write | decode |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results["sizes"]:
        lines.append(f"| {r['layout']} | {r['vocab']:,} | {r['ids']} | {r['bytes_per_position']:.1f} | "
                     f"{r['error']['max']:.2g} | {r['error']['max_above_-32']:.2g} | "
                     f"{fmt_rate(r['write_positions_per_s'])} | {fmt_rate(r['read_positions_per_s'])} |")
    d = results["data"]
    lines += ["", f"Realistic data (151,936, zipf): top-1 log-prob p10/p50/p90 {d['top1_p10_p50_p90']}, "
              f"{d['top1_above_-0.5']:.0%} above -0.5; rank-32 {d['rank32_p10_p50_p90']}; tail {d['tail_p10_p50_p90']}; "
              f"{d['topk_below_-32']:.2%} of top-k values below -32; sampled token outside the top-k at "
              f"{d['sampled_outside_topk']:.1%} of positions; {d['distinct_ids_zipf']:,} distinct ids in the shard.", "",
              "Stored arrays of the `lopd` layout (151,936, zipf):", "",
              "| array | dtype | B/position |", "|---|---|---:|"]
    for name, b in results["breakdown"].items():
        lines.append(f"| {name} | {b.get('dtype', '')} | {b['bytes_per_position']} |")
    lines += ["", "Codec sweep (shipped transforms, 151,936, zipf; blosc zstd + byte shuffle; blosc clevel c = zstd "
              "level 2c-1; **bold** = the default):", "",
              "| clevel | zstd level | blocksize | log-prob deltas | B/position | write | decode |",
              "|---:|---:|---|---|---:|---:|---:|"]
    for r in results["sweep"]:
        b = "**" if r["default"] else ""
        block = "1 MiB" if r["blocksize"] == 1 << 20 else r["blocksize"]
        lines.append(f"| {b}{r['clevel']}{b} | {r['zstd_level']} | {block} | "
                     f"{'rank-major' if r['rank_major_deltas'] else 'position-major'} | "
                     f"{b}{r['bytes_per_position']:.1f}{b} | "
                     f"{fmt_rate(r['write_positions_per_s'])} | {fmt_rate(r['read_positions_per_s'])} |")
    rr = results["read"]
    lines += ["", f"Read rates, top-{K} positions per second ({rr['shards']} shards, {rr['sequences']:,} sequences, "
              f"{rr['positions']:,} positions, mean response {rr['mean_response_tokens']:.0f} tokens, batches of "
              f"{rr['batch']}; files in the page cache). Wall = best of {rr['best_of']} runs; per CPU-second = "
              "positions / process CPU time (all threads), which other jobs on the shared cores barely move:", "",
              "| path | wall | per CPU-second |", "|---|---:|---:|"]
    for name, label in READ_PATHS.items():
        if name == "cache_warm":
            label += f"; {rr['cache_warm_sequences_per_s']:,} sequences/s"
        lines.append(f"| {label} | {fmt_rate(rr[name + '_positions_per_s'])} | "
                     f"{fmt_rate(rr[name + '_positions_per_cpu_s'])} |")
    return "\n".join(lines) + "\n"


def update_benchmarks_md(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 rows, one vocabulary (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON results (default tools/results/bench_cache.json; none with --quick)")
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = round(os.getloadavg()[0], 1)
    rows = 256 if args.quick else 1024
    vocabs = VOCABS[:1] if args.quick else VOCABS
    tmp = Path(tempfile.mkdtemp(prefix="lopd-bench-cache-"))
    try:
        truths = {v: make_truth(seed, rows, v) for seed, v in enumerate(vocabs)}
        sizes = []
        for vocab in vocabs:
            for id_model in ID_MODELS:
                layouts = LAYOUTS if id_model == "zipf" else ("lopd-plain", "lopd")
                for layout in layouts:
                    r = measure_layout(tmp, layout, truths[vocab], id_model)
                    sizes.append(r)
                    print(f"{layout:10s} {vocab:7d} {id_model:13s} {r['bytes_per_position']:7.1f} B/pos  "
                          f"err {r['error']['max']:.4f} (>=-32: {r['error']['max_above_-32']:.4f})", flush=True)
        real = truths[VOCABS[0]]
        breakdown = array_breakdown(tmp, real)
        sweep = codec_sweep(tmp, real)
        read = read_rates(tmp, real, shards=2 if args.quick else 4)
        command = "python tools/bench_cache.py" + (" --quick" if args.quick else "")
        shipped = {r["vocab"]: r for r in sizes if r["layout"] == "lopd" and r["ids"] == "zipf"}
        summary = {f"lopd_bytes_per_position_{v}": shipped[v]["bytes_per_position"] for v in vocabs}
        summary.update({
            "max_logprob_error_at_or_above_-32": max(shipped[v]["error"]["max_above_-32"] for v in vocabs),
            "max_logprob_error_all": max(shipped[v]["error"]["max"] for v in vocabs),
            "raw_decode_positions_per_s": read["raw_decode_positions_per_s"],
            "raw_decode_positions_per_cpu_s": read["raw_decode_positions_per_cpu_s"],
            "trainer_first_epoch_positions_per_s": read["trainer_first_epoch_positions_per_s"],
            "trainer_first_epoch_positions_per_cpu_s": read["trainer_first_epoch_positions_per_cpu_s"],
        })
        summary["meets_100_bytes"] = all(shipped[v]["bytes_per_position"] <= 100 for v in vocabs)
        summary["meets_1e-2_at_or_above_-32"] = summary["max_logprob_error_at_or_above_-32"] <= 1e-2
        summary["meets_1M_positions_per_s"] = read["raw_decode_positions_per_s"] >= 1e6
        results = {"command": command, "machine": machine(), "k": K, "rows_per_shard": rows, "summary": summary,
                   "data": data_stats(real), "sizes": sizes, "breakdown": breakdown, "sweep": sweep, "read": read,
                   "load_average_start_end": [load_start, round(os.getloadavg()[0], 1)],
                   "seconds": round(time.perf_counter() - started, 1)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown(results)
    print(table)
    out = args.out or (None if args.quick else ROOT / "tools" / "results" / "bench_cache.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
        if not args.quick:
            update_benchmarks_md(ROOT / "BENCHMARKS.md", table)
        print(f"wrote {out}, {out.with_suffix('.md')}" + ("" if args.quick else " and BENCHMARKS.md"))


if __name__ == "__main__":
    main()
