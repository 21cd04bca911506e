"""Cost summaries for people and programs: tables in device-hours (and money), CSV, JSON, Markdown.

One summary dict feeds every format, so `lopd cost --json`, `--csv` and the human table never
disagree. Its machine keys are unit-free (`shared_device_hours`); the unit is named once, as
"GPU-hours" or "CPU core-hours", because a CPU core-hour is far cheaper than a GPU-hour and must
not be read as one.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Iterable, Mapping, Sequence

from lopd.cost.amortize import (
    GROUPINGS,
    VIEWS,
    Group,
    Row,
    aggregate,
    amortize,
    artifacts,
    best_accuracy,
    cost_to_target,
    experiment_accuracy,
    stage_sort_key,
    total,
)
from lopd.cost.ledger import read_rows, reap_killed_runs
from lopd.cost.store import DIRECTORY
from lopd.errors import LopdError
from lopd.storage import root_url

SECONDS_PER_HOUR = 3600.0
GPU_HOURS, CPU_HOURS, MIXED_HOURS = "GPU-hours", "CPU core-hours", "device-hours (GPU and CPU core mixed)"
# Long unit name (titles, JSON) -> short name (column headers).
UNITS = {GPU_HOURS: "GPU-h", CPU_HOURS: "CPU core-h", MIXED_HOURS: "device-h"}
VIEW_NOTES = {
    "shared": "shared = an artifact's cost split equally among the experiments that use it",
    "marginal": "marginal = the experiment that produced an artifact pays for it, reuse is free",
}


def load_rows(root: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Every ledger row, after recording runs that were killed outright as such (lopd.cost.ledger)."""
    reap_killed_runs(root)
    rows = read_rows(root)
    if not rows:
        raise LopdError(
            f"the cost ledger {root_url(root)}/{DIRECTORY} has no rows; stages append rows as they run "
            "(or pass --root to read another storage root)"
        )
    return rows


def unit_of(rows: Sequence[Row]) -> str:
    """The unit of the rows that cost something (a CPU-side cache hit must not relabel GPU work)."""
    costly = [r for r in rows if r["device_seconds"] > 0] or rows
    kinds = {CPU_HOURS if r["device_kind"] == "cpu" else GPU_HOURS for r in costly}
    return kinds.pop() if len(kinds) == 1 else MIXED_HOURS


def views_for(view: str) -> tuple[str, ...]:
    """`--view both` means every view."""
    return VIEWS if view == "both" else (view,)


def _amounts(view: str, seconds: float | None, price: float | None, suffix: str = "") -> dict[str, Any]:
    hours = None if seconds is None else seconds / SECONDS_PER_HOUR
    amounts = {f"{view}_device_hours{suffix}": hours}
    if price is not None:
        amounts[f"{view}_cost{suffix}"] = None if hours is None else hours * price
    return amounts


def _group_row(
    by: str, group: Group, columns: Mapping[str, Mapping[str, Any]], views: Sequence[str], price: float | None
) -> dict[str, Any]:
    """One table row: the group, its extra `columns` (name -> value per key), counts, then amounts."""
    row: dict[str, Any] = {by: group.key, **{name: values.get(group.key) for name, values in columns.items()}}
    if by != "experiment":  # always 1 there
        row["experiments"] = group.experiments
    row["trained_tokens"] = group.trained_tokens
    for view in views:
        row |= _amounts(view, group.device_seconds(view), price)
        row |= _amounts(view, group.per_million_tokens(view), price, "_per_mtok")
    return row


def summarize(
    rows: Sequence[Row],
    *,
    by: str = "method",
    views: Sequence[str] = VIEWS,
    price: float | None = None,
    target: float | None = None,
) -> dict[str, Any]:
    """Everything `lopd cost` prints, as one JSON-able dict."""
    if by not in GROUPINGS:
        raise LopdError(f"cannot group costs by {by!r}; choose one of {', '.join(GROUPINGS)}")
    costs = amortize(rows)
    accuracy = experiment_accuracy(rows)
    columns: dict[str, Mapping[str, Any]] = {}
    if by == "experiment":
        columns["method"] = {c.experiment: c.method for c in costs}
    if by != "stage" and accuracy:
        columns["accuracy"] = best_accuracy(costs, accuracy, by)
    summary: dict[str, Any] = {
        "unit": unit_of(rows),
        "by": by,
        "views": list(views),
        "price_per_device_hour": price,
        "rows": [_group_row(by, g, columns, views, price) for g in aggregate(costs, by)],
        # Same columns as the rows, blank where a total means nothing (method, accuracy).
        "total": _group_row(by, total(costs), {name: {} for name in columns}, views, price),
    }
    unfinished = unfinished_runs(rows)
    if unfinished:
        summary["unfinished"] = unfinished
    if target is not None:
        summary["target_accuracy"] = target
        summary["to_target"] = [
            {"method": t.method, "experiment": t.experiment, "accuracy": t.accuracy}
            | _amounts("shared", t.shared_device_seconds, price)
            for t in cost_to_target(costs, accuracy, target)
        ]
    return summary


def unfinished_runs(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Failed and killed runs per (outcome, experiment, stage): how many and the device hours they spent. They
    stay in every cost above (the device time was spent); this says how much of it bought nothing."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row["outcome"] != "ok":
            groups.setdefault((row["outcome"], row["experiment"], row["stage"]), []).append(row)
    return [{"outcome": outcome, "experiment": experiment, "stage": stage, "runs": len(members),
             "device_hours": sum(r["device_seconds"] for r in members) / SECONDS_PER_HOUR}
            for (outcome, experiment, stage), members in sorted(groups.items())]


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _header(key: str, unit: str) -> str:
    return key.replace("device_hours", UNITS[unit]).replace("_per_mtok", "/Mtok").replace("_", " ")


def _numeric(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per column: right-align it (numbers only, blanks allowed)?"""
    return [all(row[key] is None or isinstance(row[key], (int, float)) for row in rows) for key in rows[0]]


def render_table(rows: Sequence[Mapping[str, Any]], unit: str) -> str:
    """Fixed-width text: numbers right-aligned, everything else left-aligned."""
    lines = [[_header(k, unit) for k in rows[0]]] + [[_cell(v) for v in row.values()] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, _numeric(rows))).rstrip()
        for line in lines
    )


def render_markdown_table(rows: Sequence[Mapping[str, Any]], unit: str) -> str:
    header = "| " + " | ".join(_header(k, unit) for k in rows[0]) + " |"
    rule = "|" + "|".join("---:" if num else ":---" for num in _numeric(rows)) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def render_text(summary: Mapping[str, Any]) -> str:
    """The human form of `summarize`: the cost table with a total line, then the target table."""
    unit, by = summary["unit"], summary["by"]
    notes = "; ".join(VIEW_NOTES[v] for v in summary["views"])
    parts = [f"cost by {by}, in {unit} ({notes})", render_table([*summary["rows"], summary["total"]], unit)]
    if "unfinished" in summary:
        parts += ["\nruns that did not finish (failed: the stage raised; killed: interrupted), included above",
                  render_table(summary["unfinished"], unit)]
    if "to_target" in summary:
        parts += [
            f"\ncheapest experiment per method reaching accuracy >= {summary['target_accuracy']:g} "
            "(shared view; '-' = not reached, accuracy is then the method's best)",
            render_table(summary["to_target"], unit),
        ]
    return "\n".join(parts)


def render_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def reuse_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Artifacts used by more than one experiment: what caching saved."""
    reused = [a for a in artifacts(rows).values() if len(a.users) > 1]
    reused.sort(key=lambda a: (stage_sort_key(a.stage), -len(a.users), a.id))
    return [
        {
            "artifact": a.id,
            "stage": a.stage,
            "produced_by": ", ".join(a.producers),
            "device_hours_to_produce": a.device_seconds / SECONDS_PER_HOUR,
            "used_by": len(a.users),
            "experiments": ", ".join(a.users),
        }
        for a in reused
    ]


def markdown_report(root: str, rows: Sequence[Row], plot_name: str) -> str:
    """One page for a storage root: methods, experiments, both cost views, cache reuse, the plot."""
    by_method, by_experiment = summarize(rows, by="method"), summarize(rows, by="experiment")
    unit = by_method["unit"]
    reuse = reuse_rows(rows)
    experiments = len(by_experiment["rows"])
    return "\n".join(
        [
            f"# lopd report: `{root}`",
            "",
            f"{len(rows)} ledger rows, {experiments} experiments; costs in {unit}.",
            "",
            *(f"- {note}" for note in VIEW_NOTES.values()),
            "- /Mtok = per million trained tokens",
            "",
            "## Methods",
            "",
            render_markdown_table(by_method["rows"], unit),
            "",
            "## Experiments",
            "",
            render_markdown_table(by_experiment["rows"], unit),
            "",
            "## Cache reuse",
            "",
            render_markdown_table(reuse, unit) if reuse else "No artifact was used by more than one experiment.",
            "",
            "## Plot",
            "",
            f"![cost per method by stage, and accuracy against cost]({plot_name})",
            "",
        ]
    )
