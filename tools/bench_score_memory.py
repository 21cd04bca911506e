"""Peak memory of `lopd score` (the whole process tree) at vocabulary 151,936 for 1k, 4k and 16k-token rollouts.

    python tools/bench_score_memory.py           # full run (~17 min on 2 busy CPU cores); tools/results/bench_score_memory.{json,png}
    python tools/bench_score_memory.py --quick   # 1k tokens only, one row (nothing written)

Model: the random-weight Qwen3 architecture of tools/real_scale.py (2 layers, hidden 256, head_dim 64, 4 heads,
2 KV heads, intermediate 768, untied embeddings, vocabulary 151,936, max_position_embeddings 32,768: 79M parameters),
its own teacher. Data: `real_scale.synthetic_rollout_set`, `--rows` rows of 64 prompt + T response tokens of random
ids, for T in (1k, 4k, 16k).

Each cell is one `lopd score --k 32` command in a fresh process, with lopd's default engine options (prefill chunk
`max_num_batched_tokens` 4,096, the engine's context sized from the longest row) plus optional `--engine-arg`s.
`lopd score` runs three processes: lopd (the vLLM front end, which also unpacks and writes the cache), vLLM's engine
core (scheduler) and its model worker. vLLM computes prompt log-probs from a float32 [scheduled tokens, vocabulary]
logits copy per engine step, so the worker's peak is set by the chunk, not by the row length. Two numbers per cell:
- "tree peak": the largest sum of the RSS of every process in the tree, sampled every `--interval` seconds
  (psutil; a lower bound: a spike shorter than the interval can be missed);
- "sum of process peaks": each process's own kernel-recorded peak RSS (VmHWM, read until it exits), summed over the
  tree (an upper bound: the processes need not peak at the same moment). Pages shared between processes (libraries,
  vLLM's shared-memory queues) count once per process in both.
The per-process peaks are reported too. The goal (issue 14): the peak at 16k tokens per rollout within 2x of that at 1k.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from bench_score import figure, finish_results, markdown_table, start_results  # noqa: E402
from real_scale import QWEN3_VOCAB, build_qwen3, synthetic_rollout_set  # noqa: E402

TOKENS = (1024, 4096, 16384)
PROMPT = 64
K = 32
GIB = 2 ** 30


def process_role(cmdline: list[str], depth: int) -> str:
    """lopd (the command itself), engine core, worker, or other (multiprocessing's resource tracker); vLLM names
    its processes in their title (`VLLM::EngineCore`, `VLLM::Worker...`)."""
    if depth == 0:
        return "lopd"
    text = " ".join(cmdline)
    if "EngineCore" in text:
        return "engine core"
    if "Worker" in text:
        return "worker"
    return "other"


def measure(cmd: list[str], env: dict, interval: float) -> dict:
    """Run `cmd`, sampling its process tree's RSS and every process's VmHWM until it exits."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    hwm: dict[int, tuple[str, int]] = {}  # pid -> (role, peak RSS bytes)
    tree_peak = 0
    # Pipes are drained by threads: a full pipe would stall the command and the sampling with it.
    chunks = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=lambda s=s, n=n: chunks[n].append(s.read()), daemon=True)
               for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
    for reader in readers:
        reader.start()
    while proc.poll() is None:
        total = 0
        try:
            tree = [(proc, 0)] + [(c, 1) for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p, depth in tree:
            try:
                total += p.memory_info().rss
                status = Path(f"/proc/{p.pid}/status").read_text()
                peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
                # vLLM retitles a process ("VLLM::EngineCore") only after it has started: keep the last known role.
                role = process_role(p.cmdline(), depth)
                if role == "other" and p.pid in hwm:
                    role = hwm[p.pid][0]
                hwm[p.pid] = (role, max(peak, hwm.get(p.pid, (role, 0))[1]))
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError, StopIteration):
                continue
        tree_peak = max(tree_peak, total)
        time.sleep(interval)
    for reader in readers:
        reader.join()
    seconds = time.perf_counter() - start
    roles: dict[str, int] = {}
    for role, peak in hwm.values():
        roles[role] = max(roles.get(role, 0), peak)
    result = {"returncode": proc.returncode, "seconds": seconds, "tree_peak_gib": tree_peak / GIB,
              "sum_of_process_peaks_gib": sum(p for _, p in hwm.values()) / GIB,
              "process_peaks_gib": {role: peak / GIB for role, peak in sorted(roles.items())},
              "processes": len(hwm)}
    stderr = "".join(chunks["stderr"])
    engine_line = next((line for line in stderr.splitlines() if line.startswith("lopd: vLLM engine ")), None)
    if engine_line:
        result["engine"] = engine_line.removeprefix("lopd: vLLM engine ")
    if proc.returncode:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else "failed"
    else:
        result["output"] = json.loads("".join(chunks["stdout"]))
    return result


def plot(cells: list[dict], target: Path) -> None:
    with figure(target, title="`lopd score --k 32` at vocabulary 151,936", xlabel="response tokens per rollout",
                ylabel="peak RSS (GiB)") as ax:
        for label, filt in (("default (4,096-token chunk)", lambda c: not c["engine_args"]),
                            (" ".join(next((c["engine_args"] for c in cells if c["engine_args"]), [])),
                             lambda c: c["engine_args"])):
            points = sorted((c["tokens"], c) for c in cells if filt(c) and "error" not in c)
            if not points:
                continue
            xs = [t for t, _ in points]
            ax.plot(xs, [c["tree_peak_gib"] for _, c in points], "-o", label=f"tree peak, {label}")
            ax.plot(xs, [c["sum_of_process_peaks_gib"] for _, c in points], "--s",
                    label=f"sum of process peaks, {label}")
            ax.plot(xs, [c["process_peaks_gib"].get("worker", 0) for _, c in points], ":^",
                    label=f"worker peak, {label}")
        ax.set_ylim(bottom=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=4, help="rollouts per set")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples of the process tree")
    parser.add_argument("--small-chunk", type=int, default=2048,
                        help="also score the longest set with --engine-arg max_num_batched_tokens=N (0: skip)")
    parser.add_argument("--work", type=Path, default=REPO / "storage" / "bench" / "score_memory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tokens = (1024,) if args.quick else TOKENS
    rows = 1 if args.quick else args.rows
    t0 = time.perf_counter()
    results = start_results(vocab=QWEN3_VOCAB, prompt_tokens=PROMPT, rows=rows, k=K, interval=args.interval)
    model = build_qwen3(args.work / "qwen3-2l-h256")
    sets = {t: synthetic_rollout_set(args.work, model, rows=rows, prompt_tokens=PROMPT, response_tokens=t).path
            for t in tokens}
    plan = [(t, []) for t in tokens]
    if args.small_chunk and not args.quick:
        plan.append((tokens[-1], [f"max_num_batched_tokens={args.small_chunk}"]))
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    lopd = [sys.executable, "-m", "lopd.cli"]
    cells = []
    for t, engine_args in plan:
        out = args.work / "scores" / f"t{t}-{'-'.join(engine_args) or 'default'}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [*lopd, "score", "--teacher", str(model), "--rollouts", str(sets[t]), "--k", str(K), "--out", str(out),
               "--root", str(args.work)] + [x for a in engine_args for x in ("--engine-arg", a)]
        cell = {"tokens": t, "rows": rows, "engine_args": engine_args, **measure(cmd, env, args.interval)}
        print(json.dumps(cell), flush=True)
        cells.append(cell)
    results["cells"] = cells

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    table_rows = []
    for c in cells:
        peaks = c.get("process_peaks_gib", {})
        table_rows.append([f"{c['tokens']:,}", ", ".join(c["engine_args"]) or "default (4,096)",
                           show(c.get("tree_peak_gib")), show(c.get("sum_of_process_peaks_gib")),
                           show(peaks.get("lopd")), show(peaks.get("engine core")), show(peaks.get("worker")),
                           f"{c['seconds']:.0f}", c.get("error", "ok")])
    table = markdown_table(["response tokens per rollout", "max_num_batched_tokens", "tree peak GiB",
                            "sum of process peaks GiB", "lopd GiB", "engine core GiB", "worker GiB", "wall s", "exit"],
                           table_rows)
    default = {c["tokens"]: c for c in cells if not c["engine_args"] and "error" not in c}
    if tokens[0] in default and tokens[-1] in default:
        ratios = {key: default[tokens[-1]][key] / default[tokens[0]][key]
                  for key in ("tree_peak_gib", "sum_of_process_peaks_gib")}
        results["ratio_longest_to_shortest"] = ratios
        table += (f"\n\nPeak at {tokens[-1]:,} / peak at {tokens[0]:,} tokens per rollout: tree peak "
                  f"{ratios['tree_peak_gib']:.2f}x, sum of process peaks {ratios['sum_of_process_peaks_gib']:.2f}x.")
    if not args.quick:
        target = args.out or TOOLS / "results" / "bench_score_memory.json"
        plot(cells, target.with_suffix(".png"))
    finish_results("score_memory", results, table, t0, args.out, args.quick)


if __name__ == "__main__":
    main()
