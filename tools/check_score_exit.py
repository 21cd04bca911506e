"""Consecutive `lopd score` commands with lopd's CPU defaults: does every one exit 0, without an exit-time race?

    python tools/check_score_exit.py              # 20 runs (~15 min on 2 shared cores); tools/results/bench_score_exit.json
    python tools/check_score_exit.py --runs 3     # a shorter check (results not written unless --out)

Why: vLLM's CPU worker given every core (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`, lopd's default) once made `lopd score`
abort at interpreter exit; lopd now stops its engine before it exits (lopd/engine.py `shutdown_llm`). Each run is
`lopd score --k 8` on the toy teacher over 64 rows of random ids (8 + 40 tokens), in a fresh process, with the
environment this script runs in (so `VLLM_CPU_NUM_OF_RESERVED_CPU=1 python tools/check_score_exit.py` checks vLLM's
own default). Recorded per run: exit code, wall seconds, and which signs of an exit-time teardown race its output
shows (tests/test_engine_exit.py lists them), plus vLLM's "leaked shared_memory" warning.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(REPO))
from bench_score import finish_results, markdown_table, random_rollout_set, start_results  # noqa: E402

SIGNS = ("Aborted", "Fatal Python error", "terminate called", "core dumped", "engine core exited unexpectedly",
         "force killing", "leaked shared_memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lopd-score-exit"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from lopd.toy import TEACHER_DIR

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = start_results(runs=[])
    rollouts = random_rollout_set(args.work / "rollouts", str(TEACHER_DIR), 64, 8, 40)
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))
    for i in range(args.runs):
        out = args.work / f"scores-{i}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lopd.cli", "score", "--teacher", str(TEACHER_DIR), "--rollouts",
                               str(rollouts.path), "--k", "8", "--out", str(out), "--root", str(args.work)],
                              env=env, capture_output=True, text=True, cwd=REPO)
        log = proc.stdout + proc.stderr
        run = {"run": i + 1, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
               "signs": [s for s in SIGNS if s in log], "reserved_cpus": next(
                   (line.split("reserve_cpu_num=")[1].split()[0] for line in log.splitlines()
                    if "reserve_cpu_num=" in line), None)}
        print(run, flush=True)
        results["runs"].append(run)
        shutil.rmtree(out, ignore_errors=True)
    runs = results["runs"]
    clean = sum(r["returncode"] == 0 and not r["signs"] for r in runs)
    results["clean_runs"] = clean
    table = markdown_table(["runs", "exit 0", "clean (exit 0, no sign)", "reserved cores", "wall s (min-max)"],
                           [[len(runs), sum(r["returncode"] == 0 for r in runs), clean,
                             ",".join(sorted({str(r["reserved_cpus"]) for r in runs})),
                             f"{min(r['seconds'] for r in runs):.0f}-{max(r['seconds'] for r in runs):.0f}"]])
    finish_results("score_exit", results, table, t0, args.out, quick=args.runs < 20)


if __name__ == "__main__":
    main()
