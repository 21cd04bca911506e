"""`lopd cost` and `lopd report`: the ledger as tables, JSON, CSV, a plot and a Markdown page.

matplotlib is imported only when a plot is asked for, so these commands keep `lopd --help` fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from lopd.cost.amortize import GROUPINGS, VIEWS, amortize, experiment_accuracy
from lopd.cost.report import load_rows, markdown_report, render_csv, render_text, summarize, unit_of, views_for
from lopd.errors import LopdError
from lopd.storage import local_root, resolve_root, root_url

root_option = click.option(
    "--root",
    default=None,
    help="Storage root holding the ledger: a directory or a bucket URL such as s3://bucket/prefix (default: "
    "$LOPD_ROOT, else storage/ of a source checkout, else ~/.cache/lopd).",
)


def _plot(rows: list[dict], view: str, path: Path) -> None:
    from lopd.cost.plot import plot_costs

    plot_costs(amortize(rows), experiment_accuracy(rows), view=view, unit=unit_of(rows), path=path)


@click.command("cost")
@root_option
@click.option("--by", type=click.Choice(GROUPINGS), default="method", show_default=True, help="Rows of the table.")
@click.option(
    "--view",
    type=click.Choice((*VIEWS, "both")),
    default="both",
    show_default=True,
    help="shared: reused artifacts' cost split among their users; marginal: the producer pays, reuse is free.",
)
@click.option("--price-per-device-hour", type=click.FloatRange(min=0), help="Adds money columns: hours x price.")
@click.option(
    "--target-accuracy",
    type=float,
    help="Also show, per method, the cheapest experiment (shared view) whose eval accuracy reached this.",
)
@click.option("--json", "fmt", flag_value="json", help="Print the summary as JSON.")
@click.option("--csv", "fmt", flag_value="csv", help="Print the table as CSV (one row per group).")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG: cost per method stacked by stage, and accuracy against cost when known.",
)
def cost(
    root: str | None,
    by: str,
    view: str,
    price_per_device_hour: float | None,
    target_accuracy: float | None,
    fmt: str | None,
    plot: Path | None,
) -> None:
    """Device-hours per method, stage or experiment, with shared teacher caches amortised."""
    if fmt == "csv" and target_accuracy is not None:
        raise LopdError("--target-accuracy has no CSV form; use --json or the table output")
    rows = load_rows(root)
    views = views_for(view)
    summary = summarize(rows, by=by, views=views, price=price_per_device_hour, target=target_accuracy)
    if fmt == "json":
        click.echo(json.dumps(summary, indent=1))
    elif fmt == "csv":
        click.echo(render_csv(summary["rows"]), nl=False)
    else:
        click.echo(render_text(summary))
    if plot is not None:
        _plot(rows, views[0], plot)
        click.echo(f"wrote {plot}", err=True)


@click.command("report")
@root_option
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Markdown file (default: <root>/report.md; needed for a bucket root); its plot is written beside it as "
    "<name>.png.",
)
def report(root: str | None, out: Path | None) -> None:
    """One Markdown page for a storage root: methods, accuracy, cost in both views, cache reuse."""
    if out is None and local_root(root) is None:
        raise LopdError(f"lopd report writes report.md into the storage root, and {root_url(root)} is a bucket; "
                        "pass --out FILE")
    out = out or resolve_root(root) / "report.md"
    rows = load_rows(root)
    png = out.with_suffix(".png")
    _plot(rows, "shared", png)
    out.write_text(markdown_report(root_url(root), rows, png.name))
    click.echo(f"wrote {out} and {png}")
