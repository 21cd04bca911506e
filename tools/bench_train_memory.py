"""Peak memory and speed of one training step at vocabulary 151,936: chunked student head against the full-logits path.

    python tools/bench_train_memory.py            # full run (~25 min on 2 CPU cores); tools/results/bench_train_memory.{json,png}
    python tools/bench_train_memory.py --quick    # 1k tokens, lightning only: a smoke run (nothing written)

Model: the random-weight Qwen3 architecture of tools/real_scale.py (2 layers, hidden 256, head_dim 64, 4 heads, 2 KV
heads, intermediate 768, untied embeddings, vocabulary 151,936: 79M parameters). Data: one row of 64 prompt + T
response tokens with a k=32 teacher top-k, written through lopd's real cache writers (synthetic numbers).

Part 1, one micro-batch per process (a fresh subprocess per cell, so peaks do not mix): the trainer's StudentHead, a
float32 AdamW step, per loss in (lightning, rkl_topk, gkd) and T in (1k, 4k, 16k), along two paths:
  - chunked: `StudentHead` (the trainer's path; lm_head `--chunk` positions at a time, recomputed in backward);
  - full: the path lopd trained with before: `model(...).logits` [B, L, V], response rows gathered, log-softmax,
    all kept for backward (run only where its analytical size fits this machine; otherwise its size is computed).
Peak memory is peak RSS on CPU (`ru_maxrss`), `torch.cuda.max_memory_allocated` on CUDA. "Loss side" is a step's peak
above the steady state between steps (parameters, gradients and optimizer state already allocated by a warm-up
step), i.e. what the forward/backward of that micro-batch costs. Tokens/s are response tokens per second of the
timed steps (after the warm-up step), both paths measured in the same run.

Part 2, the whole `lopd train` command (DeepSpeed ZeRO-2, default options, batch 1, rkl_topk, 2 steps) on one row of
each `--cli-tokens` length (default 4k): peak RSS of the process (`RUSAGE_CHILDREN`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from bench_score import figure, finish_results, markdown_table, start_results  # noqa: E402
from real_scale import QWEN3_VOCAB, build_qwen3, synthetic_score_set  # noqa: E402

LOSSES = ("lightning", "rkl_topk", "gkd")
TOKENS = (1024, 4096, 16384)
PROMPT = 64
K = 32
GIB = 2 ** 30
FULL_COPIES = 5.1  # float32 [T, V] copies the full path holds (measured: 2.96 MB per token at V = 151,936)


def full_path_gib(tokens: int) -> float:
    return FULL_COPIES * tokens * QWEN3_VOCAB * 4 / GIB


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_cell(model_dir: str, cache_dir: str, loss: str, path: str, chunk: int, steps: int) -> dict:
    """One micro-batch, `steps` timed optimizer steps after a warm-up step; runs inside its own process."""
    import torch

    from lopd.cache.reader import open_cache
    from lopd.losses import get_loss
    from lopd.train.config import TrainConfig
    from lopd.train.data import SequenceDataset, collate
    from lopd.train.student_head import load_student

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_student(model_dir, TrainConfig(loss_chunk_size=chunk)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = collate([SequenceDataset(open_cache(cache_dir))[0]], pad_id=0).to(device)
    spec = get_loss(loss)
    args = spec.resolve_args({})
    request = spec.student_request(args)

    def step() -> float:
        start = time.perf_counter()
        if path == "chunked":
            inputs = batch.loss_inputs(model(batch, request))
        else:
            logits = model.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            inputs = batch.loss_inputs_from_logits(logits, request)
        loss_value = spec.fn(inputs, **args).loss
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: optimizer state, allocator pools
    steady = current_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [step() for _ in range(steps)]
    peak = peak_bytes(device)
    tokens = int(batch.mask.sum())
    return {"loss": loss, "path": path, "tokens": tokens, "chunk": chunk if path == "chunked" else None,
            "device": device.type, "peak_gib": peak / GIB, "loss_side_gib": max(peak - steady, 0) / GIB,
            "step_seconds": sum(seconds) / len(seconds), "tokens_per_s": tokens * len(seconds) / sum(seconds)}


def run_cell(model_dir: Path, cache: Path, loss: str, path: str, chunk: int, steps: int, done: Path) -> dict:
    """One cell in a fresh process; its result is kept under `done` so an interrupted run resumes cell by cell."""
    saved = done / f"{cache.name}-{loss}-{path}-c{chunk}-s{steps}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    cmd = [sys.executable, __file__, "--cell", str(model_dir), str(cache), loss, path, str(chunk), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        return {"loss": loss, "path": path, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    done.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    return result


def run_cli(model_dir: Path, cache: Path, work: Path, tokens: int) -> dict:
    """The whole `lopd train` process with default options on one row. It runs under a wrapper process whose only
    child it is, so the wrapper's RUSAGE_CHILDREN peak is that command's alone (not this script's earlier cells)."""
    import shutil

    out = work / f"cli-{tokens}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "lopd"), "train", "--student", str(model_dir), "--cache", str(cache),
           "--loss", "rkl_topk", "--batch-size", "1", "--steps", "2", "--out", str(out), "--root", str(work)]
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
               "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    returncode, peak_kib = (int(x) for x in proc.stdout.split()[-2:])
    result = {"tokens": tokens, "seconds": seconds, "returncode": returncode, "peak_gib": peak_kib * 1024 / GIB}
    if returncode:
        result["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"
    return result


def plot(cells: list[dict], target: Path) -> None:
    with figure(target, title="One training step at vocabulary 151,936", xlabel="response tokens in the micro-batch",
                ylabel="loss-side peak memory (GiB)") as ax:
        for loss in LOSSES:
            for path, style in (("chunked", "-o"), ("full", "--s")):
                points = sorted((c["tokens"], c["loss_side_gib"]) for c in cells
                                if c.get("loss") == loss and c.get("path") == path and "loss_side_gib" in c)
                if points:
                    ax.plot(*zip(*points), style, label=f"{loss} ({path})")
        xs = sorted({c["tokens"] for c in cells if "tokens" in c})
        ax.plot(xs, [full_path_gib(x) for x in xs], ":", color="grey",
                label=f"full path, analytical ({FULL_COPIES} x T x V x 4 B)")
        ax.set_yscale("log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk", type=int, default=None, help="lm_head chunk (default: lopd train's default)")
    parser.add_argument("--full-up-to-gib", type=float, default=14.0,
                        help="run the full path only where its analytical size is at most this")
    parser.add_argument("--cli-tokens", type=int, nargs="*", default=[4096],
                        help="row lengths for the whole-command runs of part 2")
    parser.add_argument("--work", type=Path, default=REPO / "storage" / "bench" / "train_memory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from lopd.train.config import DEFAULT_LOSS_CHUNK_SIZE

    chunk = args.chunk or DEFAULT_LOSS_CHUNK_SIZE
    tokens = (1024,) if args.quick else TOKENS
    t0 = time.perf_counter()
    results = start_results(chunk=chunk, vocab=QWEN3_VOCAB, prompt_tokens=PROMPT, k=K)
    model = build_qwen3(args.work / "qwen3-2l-h256")
    caches = {t: synthetic_score_set(args.work, model, rows=1, prompt_tokens=PROMPT, response_tokens=t, k=K).path
              for t in sorted(set(tokens) | set(() if args.quick else args.cli_tokens))}
    cells = []
    for t in tokens:
        steps = 2 if t <= 4096 else 1
        for loss in LOSSES[:1] if args.quick else LOSSES:
            for path in ("chunked", "full"):
                if path == "full" and full_path_gib(t) > args.full_up_to_gib:
                    cells.append({"loss": loss, "path": path, "tokens": t, "skipped": "does not fit",
                                  "analytical_gib": full_path_gib(t)})
                    continue
                cell = run_cell(model, caches[t], loss, path, chunk, steps, args.work / "cells")
                cell.setdefault("tokens", t)
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    results["cells"] = cells
    results["cli"] = [] if args.quick else [run_cli(model, caches[t], args.work, t) for t in args.cli_tokens]
    for row in results["cli"]:
        print(json.dumps(row), flush=True)

    def show(cell: dict | None, key: str, digits: int = 2) -> str:
        if cell is None or cell.get(key) is None:
            return "-"
        return f"{cell[key]:,.{digits}f}"

    rows = []
    for t in tokens:
        for loss in LOSSES:
            chunked = next((c for c in cells if c["tokens"] == t and c["loss"] == loss and c["path"] == "chunked"), None)
            full = next((c for c in cells if c["tokens"] == t and c["loss"] == loss and c["path"] == "full"), None)
            full_side = show(full, "loss_side_gib") if full and "skipped" not in full else f"({full_path_gib(t):.1f}, analytical)"
            ratio = (chunked["tokens_per_s"] / full["tokens_per_s"]
                     if chunked and full and "tokens_per_s" in full and "tokens_per_s" in chunked else None)
            rows.append([t, loss, show(chunked, "peak_gib"), show(chunked, "loss_side_gib"), full_side,
                         show(chunked, "tokens_per_s", 0), show(full, "tokens_per_s", 0),
                         f"{ratio:.2f}" if ratio else "-"])
    table = markdown_table(["T", "loss", "chunked peak GiB", "chunked loss side GiB", "full loss side GiB",
                            "chunked tok/s", "full tok/s", "chunked / full speed"], rows)
    if results["cli"]:
        table += "\n\n" + markdown_table(["`lopd train` row tokens", "peak RSS GiB", "wall s"],
                                         [[r["tokens"], show(r, "peak_gib"), f"{r['seconds']:.0f}"] for r in results["cli"]])
    if not args.quick:
        target = args.out or TOOLS / "results" / "bench_train_memory.json"
        plot(cells, target.with_suffix(".png"))
    finish_results("train_memory", results, table, t0, args.out, args.quick)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--cell":
        model_dir, cache_dir, loss, path, chunk, steps = sys.argv[2:8]
        print(json.dumps(one_cell(model_dir, cache_dir, loss, path, int(chunk), int(steps))))
    else:
        main()
