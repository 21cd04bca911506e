"""`lopd demo`: the Lightning OPD recipe on the bundled toy world, end to end, against fair baselines.

It runs `pipelines/lightning_toy.toml` (or `smoke_toy.toml` with --quick) through `lopd run` and presents
the result: per seed, the teacher writes SFT data -> the student base is SFT'd on it -> the SFT student rolls
out on the OPD prompts -> the teacher scores those rollouts once -> offline OPD from that one cache
(`lightning`, and `rkl_topk`, reverse KL over the cached teacher top-k) -> evaluation. Baselines trained for
the same steps from the same SFT checkpoint: SFT-more (SFT on teacher samples for the OPD prompts) and online
OPD (`rkl_topk` on rollouts re-sampled and re-scored every step).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from lopd.pipeline.plan import load_spec
from lopd.pipeline.run import plot_accuracies, run_pipeline

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"

# Rows of the demo table: pipeline model/stage id -> label.
ARMS = {
    "teacher": "teacher",
    "student": "student base",
    "sft": "SFT student",
    "sft_more": "SFT-more (teacher samples, same steps)",
    "opd_lightning": "offline OPD: lightning (cache)",
    "opd_rkl_topk": "offline OPD: rkl_topk (cache)",
    "online_rkl_topk": "online OPD: rkl_topk (re-sampled every step)",
}


def run_demo(quick: bool, seeds: list[int] | None, root: Path, out: Path) -> dict[str, Any]:
    spec = load_spec(PIPELINES / ("smoke_toy.toml" if quick else "lightning_toy.toml"))
    if seeds is not None:
        spec["seeds"] = seeds
    start = time.perf_counter()
    results = run_pipeline(spec, root)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = demo_table(results)
    (out / "results.md").write_text(table + "\n")
    plot_accuracies(results, out / "results.png", "lopd demo: toy dictionary world", ARMS)
    print("\n" + table)
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return results


def demo_table(results: dict[str, Any]) -> str:
    seeds = list(results["seeds"])
    lines = ["| arm | " + " | ".join(f"seed {s} valid % (distinct)" for s in seeds) + " | mean valid % |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for arm, label in ARMS.items():
        cells = [results["seeds"][s]["evals"][arm] for s in seeds]
        mean = statistics.mean(c["accuracy"] for c in cells) * 100
        lines.append(f"| {label} | " + " | ".join(f"{c['accuracy'] * 100:.1f} ({c['distinct_correct']})" for c in cells)
                     + f" | {mean:.1f} |")
    stages = list(results["seeds"][seeds[0]]["stage_seconds"])
    lines += ["", "| stage | " + " | ".join(f"seed {s} s" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{results['seeds'][s]['stage_seconds'].get(stage, 0):.1f}"
                                               for s in seeds) + " |")
    lines.append(f"\nTotal wall time {results['total_seconds']:.0f} s (a stage reused from an earlier run shows its "
                 "original seconds).")
    return "\n".join(lines)
