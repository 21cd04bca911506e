"""Tables and plots for the two studies of the paper's claims, from a finished `lopd run`'s results.json.

`lightning`: pipelines/lightning_study_toy.toml. Per arm (a trained model): valid % per seed, its mean and standard
error over seeds, and what the arm's metrics.jsonl logged over training (mean advantage and its variance, gradient
norm, teacher_kl at the first and last logged step), plus each method's best learning rate (chosen on the
evaluation prompts: the same four-point grid for every method, so the selection favours none).
`consistency`: pipelines/teacher_consistency_toy.toml. Per loss: valid % from teacher A's cache (consistent) and
from teacher B's (inconsistent), and consistent minus inconsistent per seed with its mean and standard error.

Usage: python tools/study_results.py lightning storage/runs/lightning_study_toy/results.json docs/lightning_study
writes docs/lightning_study.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

TRAINING_METRICS = ("advantage", "advantage_var", "grad_norm")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (one degree of freedom with two seeds: a rough error bar)."""
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def accuracy(results: dict[str, Any], model: str) -> list[float]:
    """Valid % of `model` on each seed that evaluated it."""
    return [seed["evals"][model]["accuracy"] * 100 for seed in results["seeds"].values() if model in seed["evals"]]


def metric_rows(results: dict[str, Any], seed: str, stage: str) -> list[dict[str, Any]]:
    output = results["seeds"][seed]["outputs"].get(stage)
    path = Path(output["path"]) / "metrics.jsonl" if output else None
    return [json.loads(line) for line in path.read_text().splitlines()] if path and path.exists() else []


def training_summary(results: dict[str, Any], stage: str) -> dict[str, float]:
    """Means over seeds of what training logged: each metric averaged over the run, teacher_kl first and last."""
    per_seed: dict[str, list[float]] = {}
    for seed in results["seeds"]:
        rows = metric_rows(results, seed, stage)
        for name in TRAINING_METRICS:
            values = [row[name] for row in rows if name in row]
            if values:
                per_seed.setdefault(name, []).append(statistics.mean(values))
        kl = [row["teacher_kl"] for row in rows if "teacher_kl" in row]
        if kl:
            per_seed.setdefault("teacher_kl_start", []).append(kl[0])
            per_seed.setdefault("teacher_kl_end", []).append(kl[-1])
    return {name: statistics.mean(values) for name, values in per_seed.items()}


def arm(results: dict[str, Any], model: str) -> dict[str, Any]:
    values = accuracy(results, model)
    mean, se = mean_se(values)
    return {"model": model, "valid_pct": values, "mean": round(mean, 2), "se": round(se, 2),
            **{k: round(v, 4) for k, v in training_summary(results, model).items()}}


def method_of(model: str) -> tuple[str, float] | None:
    """('lightning', 1e-4) for 'lightning_lr0.0001': the method and learning rate of a grid arm."""
    match = re.fullmatch(r"(.+)_lr([0-9.e-]+)", model)
    return (match[1], float(match[2])) if match else None


def lightning_study(results: dict[str, Any]) -> dict[str, Any]:
    models = list(dict.fromkeys(m for seed in results["seeds"].values() for m in seed["evals"]))
    arms = [arm(results, model) for model in models]
    best: dict[str, dict[str, Any]] = {}
    for row in arms:
        parsed = method_of(row["model"])
        if parsed and (parsed[0] not in best or row["mean"] > best[parsed[0]]["mean"]):
            best[parsed[0]] = {**row, "lr": parsed[1]}
    return {"study": "lightning", "arms": arms, "best_lr": best}


def consistency_study(results: dict[str, Any]) -> dict[str, Any]:
    """opd_{loss}_cache_a (consistent) against opd_{loss}_cache_b (inconsistent), seed by seed."""
    models = {m for seed in results["seeds"].values() for m in seed["evals"]}
    losses = sorted({m[len("opd_"):-len("_cache_a")] for m in models if m.startswith("opd_") and m.endswith("_cache_a")})
    rows = []
    for loss in losses:
        consistent, inconsistent = accuracy(results, f"opd_{loss}_cache_a"), accuracy(results, f"opd_{loss}_cache_b")
        difference = [a - b for a, b in zip(consistent, inconsistent, strict=True)]
        (c, c_se), (i, i_se), (d, d_se) = mean_se(consistent), mean_se(inconsistent), mean_se(difference)
        rows.append({"loss": loss, "consistent": consistent, "inconsistent": inconsistent, "difference": difference,
                     "consistent_mean": round(c, 2), "consistent_se": round(c_se, 2), "inconsistent_mean": round(i, 2),
                     "inconsistent_se": round(i_se, 2), "difference_mean": round(d, 2), "difference_se": round(d_se, 2)})
    references = [arm(results, model) for model in ("teacher", "teacher_b", "sft") if model in models]
    return {"study": "consistency", "losses": rows, "references": references}


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def lightning_markdown(study: dict[str, Any]) -> str:
    lines = ["| arm | valid % per seed | mean ± SE | advantage | advantage var | grad norm | teacher_kl start → end |",
             "|---|---|---|---|---|---|---|"]
    for row in study["arms"]:
        kl = (f"{row['teacher_kl_start']:.3f} → {row['teacher_kl_end']:.3f}" if "teacher_kl_end" in row else "-")
        lines.append(f"| {row['model']} | {' / '.join(f'{v:.1f}' for v in row['valid_pct'])} | {row['mean']:.1f} ± "
                     f"{row['se']:.1f} | {fmt(row.get('advantage'))} | {fmt(row.get('advantage_var'))} | "
                     f"{fmt(row.get('grad_norm'))} | {kl} |")
    lines += ["", "| method | best lr | mean ± SE |", "|---|---|---|"]
    lines += [f"| {name} | {row['lr']:g} | {row['mean']:.1f} ± {row['se']:.1f} |" for name, row in study["best_lr"].items()]
    return "\n".join(lines)


def consistency_markdown(study: dict[str, Any]) -> str:
    lines = ["| loss | consistent (A's cache) % | inconsistent (B's cache) % | consistent − inconsistent (points) |",
             "|---|---|---|---|"]
    for row in study["losses"]:
        lines.append(f"| {row['loss']} | {' / '.join(f'{v:.1f}' for v in row['consistent'])} "
                     f"({row['consistent_mean']:.1f} ± {row['consistent_se']:.1f}) | "
                     f"{' / '.join(f'{v:.1f}' for v in row['inconsistent'])} ({row['inconsistent_mean']:.1f} ± "
                     f"{row['inconsistent_se']:.1f}) | {row['difference_mean']:+.1f} ± {row['difference_se']:.1f} |")
    lines += ["", "| reference | valid % per seed | mean ± SE |", "|---|---|---|"]
    lines += [f"| {row['model']} | {' / '.join(f'{v:.1f}' for v in row['valid_pct'])} | {row['mean']:.1f} ± "
              f"{row['se']:.1f} |" for row in study["references"]]
    return "\n".join(lines)


def plot(study: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    """Lightning: valid % by arm (mean ± SE) beside teacher_kl over training for each method's best learning rate.
    Consistency: valid % from each cache per loss, with the seeds as dots. A k = 1 arm has no curve: its
    teacher_kl has a single top-k bucket, a coarser lower bound than the others'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if study["study"] == "lightning":
        fig, (bars, curves) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [2, 1]})
        arms = study["arms"]
        bars.bar(range(len(arms)), [a["mean"] for a in arms], yerr=[0 if math.isnan(a["se"]) else a["se"] for a in arms],
                 color=["tab:orange" if "lightning" in a["model"] else "tab:blue" for a in arms])
        bars.set_xticks(range(len(arms)), [a["model"] for a in arms], rotation=60, ha="right", fontsize=7)
        bars.set_ylim(max(0, min(a["mean"] for a in arms if a["mean"] > 5) - 10), 100)
        bars.set_ylabel("valid % (mean ± SE over seeds)")
        for reference, style in (("sft", ":"), ("sft_more", "--")):
            level = next((a["mean"] for a in arms if a["model"] == reference), None)
            if level is not None:
                bars.axhline(level, linestyle=style, color="grey", label=reference)
        bars.legend(fontsize=8, loc="lower left")
        for name, best in study["best_lr"].items():
            if name.endswith("_k1"):  # its teacher_kl has one top-k bucket: a coarser bound, not comparable
                continue
            rows = [r for r in metric_rows(results, next(iter(results["seeds"])), best["model"]) if "teacher_kl" in r]
            curves.plot([r["step"] for r in rows], [r["teacher_kl"] for r in rows], label=f"{name} (lr {best['lr']:g})")
        curves.set_xlabel("step (seed 0)")
        curves.set_ylabel("teacher_kl (top-k + tail bucket)")
        curves.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, row in enumerate(study["losses"]):
            for offset, key, colour in ((-0.2, "consistent", "tab:blue"), (0.2, "inconsistent", "tab:red")):
                ax.bar(i + offset, statistics.mean(row[key]), width=0.4, color=colour, label=key if i == 0 else None)
                ax.scatter([i + offset] * len(row[key]), row[key], color="black", s=12, zorder=3)
        ax.set_xticks(range(len(study["losses"])), [row["loss"] for row in study["losses"]])
        low = min(v for row in study["losses"] for v in row["consistent"] + row["inconsistent"])
        ax.set_ylim(max(0, low - 10), 100)
        ax.set_ylabel("valid % (bars: mean, dots: seeds)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["lightning", "consistency"])
    parser.add_argument("results", type=Path, help="results.json of the study's `lopd run`")
    parser.add_argument("out", type=Path, help="output stem: writes OUT.json, OUT.md and OUT.png")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    study = lightning_study(results) if args.study == "lightning" else consistency_study(results)
    table = lightning_markdown(study) if args.study == "lightning" else consistency_markdown(study)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(study, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(study, results, args.out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
