"""Running a pipeline end to end: every seed's plan, then results.json, a Markdown table and an accuracy plot."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lopd.location import Location, join
from lopd.mirror import mirror_path, publish
from lopd.pipeline.plan import plan, runs_dir
from lopd.pipeline.stages import StageRunner
from lopd.storage import write_json_atomic


def run_pipeline(spec: dict[str, Any], root: Location, dry_run: bool = False) -> dict[str, Any] | None:
    """Run (or reuse) every stage of every seed under `root`, a local directory or a bucket URL; results are
    written beside the seeds' state, in the bucket too when the root is one."""
    plans = plan(spec, root)
    for p in plans:
        for line in p.describe():
            print(line)
    if dry_run:
        return None
    out_dir = runs_dir(root, spec)
    results: dict[str, Any] = {"pipeline": spec["name"], "seeds": {}}
    runner = StageRunner(spec, root)
    try:
        for p in plans:
            results["seeds"][str(p.seed)] = runner.run_plan(p, join(out_dir, f"seed{p.seed}"))
    finally:
        runner.close()
    local = mirror_path(out_dir)
    local.mkdir(parents=True, exist_ok=True)
    write_json_atomic(local / "results.json", results)
    table = results_table(results)
    (local / "results.md").write_text(table + "\n")
    plot_accuracies(results, local / "results.png", title=f"lopd run {spec['name']}")
    written = [publish(local / name, join(out_dir, name)) for name in ("results.json", "results.md", "results.png")]
    print(table)
    print(f"\nwritten: {', '.join(map(str, written))}")
    return results


def plot_accuracies(results: dict[str, Any], path: Path, title: str, labels: dict[str, str] | None = None) -> None:
    """Bar per evaluated model (mean over seeds) with a dot per seed; `labels` picks and names the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(results["seeds"])
    models = list(labels) if labels else list(dict.fromkeys(m for s in seeds for m in results["seeds"][s]["evals"]))
    names = [labels[m] if labels else m for m in models]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(models) + 2), 4))
    lowest = 100.0
    for i, model in enumerate(models):
        values = [results["seeds"][s]["evals"][model]["accuracy"] * 100 for s in seeds if model in results["seeds"][s]["evals"]]
        ax.bar(i, statistics.mean(values), color="tab:orange" if "opd" in model.lower() or "loss_" in model else "tab:blue")
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        if values and min(values) > 5:
            lowest = min(lowest, min(values))
    ax.set_xticks(range(len(models)), [n.split(" (")[0] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(max(0.0, lowest - 10), 100)
    ax.set_title(f"{title} (bars: mean, dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(results: dict[str, Any]) -> str:
    """Evaluated models (rows) by seed: accuracy, plus the seconds of the stage that produced each model."""
    seeds = list(results["seeds"])
    models = list(dict.fromkeys(m for s in seeds for m in results["seeds"][s]["evals"]))
    refresh_cols = ("refreshes", "refresh_rollout_seconds", "refresh_teacher_seconds")
    with_refresh = any(results["seeds"][s].get("refreshes") for s in seeds)
    header = "| model | " + " | ".join(f"seed {s} acc % (distinct)" for s in seeds) + " | mean acc % | train s |"
    if with_refresh:
        header += " refreshes | refresh rollout s | refresh teacher s |"
    lines = [header, "|---|" + "---|" * (len(seeds) + 2 + 3 * with_refresh)]

    def mean_of(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f}" if values else "-"

    for model in models:
        cells = [results["seeds"][s]["evals"].get(model) for s in seeds]
        accuracy = statistics.mean(c["accuracy"] * 100 for c in cells if c)
        seconds = [results["seeds"][s]["seconds"][model] for s in seeds if model in results["seeds"][s]["seconds"]]
        per_seed = " | ".join(f"{c['accuracy'] * 100:.1f} ({c['distinct_correct']})" if c else "-" for c in cells)
        row = f"| {model} | {per_seed} | {accuracy:.1f} | {mean_of(seconds)} |"
        if with_refresh:
            refresh = [results["seeds"][s].get("refreshes", {}).get(model) for s in seeds]
            row += "".join(f" {mean_of([r[c] for r in refresh if r])} |" for c in refresh_cols)
        lines.append(row)
    lines.append("\n`train s` is the whole training stage, refreshes included; mean over seeds.")
    return "\n".join(lines)
