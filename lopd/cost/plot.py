"""The cost picture: device-hours per method stacked by stage, and accuracy against cost.

Drawn on a bare `Figure` (Agg rendering, no pyplot), so plotting needs no display and leaves no
global backend state behind in the process that called it.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure

from lopd.cost.amortize import CostRow, stage_sort_key
from lopd.cost.report import SECONDS_PER_HOUR


def plot_costs(costs: Sequence[CostRow], accuracy: Mapping[str, float], *, view: str, unit: str, path: Path) -> None:
    """Write a PNG; the scatter panel appears only when some experiment has an accuracy."""
    hours: dict[tuple[str, str], float] = defaultdict(float)
    spent: dict[str, float] = defaultdict(float)
    method_of: dict[str, str] = {}
    for cost in costs:
        hours[(cost.method, cost.stage)] += cost.device_seconds(view) / SECONDS_PER_HOUR
        spent[cost.experiment] += cost.device_seconds(view) / SECONDS_PER_HOUR
        method_of[cost.experiment] = cost.method
    methods = sorted(set(method_of.values()))
    labels = [m or "-" for m in methods]

    fig = Figure(figsize=(13 if accuracy else 7, 5), layout="constrained")
    axes = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    bottom = [0.0] * len(methods)
    for stage in sorted({c.stage for c in costs}, key=stage_sort_key):
        heights = [hours[(m, stage)] for m in methods]
        axes[0].bar(labels, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[0].set(title=f"cost per method ({view} view)", ylabel=unit)
    axes[0].tick_params(axis="x", labelrotation=60, labelsize=8)
    axes[0].legend(title="stage")

    if accuracy:
        for method, label in zip(methods, labels):
            evaluated = [e for e, m in method_of.items() if m == method and e in accuracy]
            if evaluated:
                axes[1].scatter([spent[e] for e in evaluated], [accuracy[e] for e in evaluated], label=label)
                for e in evaluated:  # the experiment's last path component keeps labels short
                    axes[1].annotate(e.rsplit("/", 1)[-1], (spent[e], accuracy[e]), fontsize=6, xytext=(3, 3),
                                     textcoords="offset points")
        axes[1].set(title="accuracy against cost", xlabel=f"{unit} ({view} view)", ylabel="accuracy")
        axes[1].legend(title="method", fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
