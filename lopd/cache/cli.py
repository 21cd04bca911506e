"""`lopd cache ...`: list, inspect, verify, garbage-collect and export score sets."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from lopd import location
from lopd.cache import admin
from lopd.cache.score_set import read_manifest
from lopd.errors import LopdError
from lopd.storage import root_location, writable_root

# Every cache command takes a bucket root too (lopd.location).
BUCKET_ROOT = click.option("--root", default=None,
                         help="Storage root: a directory or a bucket URL such as s3://bucket/prefix.")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def cache() -> None:
    """Inspect and maintain the teacher cache (score sets)."""


def report_score(result) -> None:
    """What `lopd score` and `lopd cache repair` print: a line on stderr for a hit, a repair or a set that other
    `--shard` workers still have to finish, JSON on stdout."""
    if not result.complete:
        worker, workers = result.shard_of
        others = ", ".join(f"--shard {i}/{workers}" for i in range(workers) if i != worker)
        click.echo(f"shard {worker}/{workers} done; {result.shards_written} of {result.shards_total} shards written; "
                   f"run the other shards ({others}) to complete {result.id}", err=True)
    if result.reused:
        click.echo(f"cache hit: score set {result.id} already holds these scores; no teacher work done", err=True)
    if result.repaired:
        click.echo(f"repaired score set {result.id}: rescored shard "
                   + ", ".join(f"{name} ({why})" for name, why in result.repaired.items()), err=True)
    click.echo(json.dumps({"score_set": result.id, "path": str(result.path), "reused": result.reused,
                           "repaired": sorted(result.repaired), "complete": result.complete, "teacher_seconds": round(result.teacher_seconds, 2),
                           "positions": result.positions}, indent=1))


@cache.command("ls")
@BUCKET_ROOT
@JSON
def ls(root, as_json):
    """Score sets: size, bytes per position, teacher, k, and the experiments that used each."""
    rows = admin.entries(root_location(root))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'id':20s} {'created':16s} {'k':>4s} {'rows':>7s} {'MB':>8s} {'B/pos':>6s}  teacher / experiments")
    for e in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created"] or 0))
        flag = "" if e["complete"] else " (incomplete)"
        click.echo(f"{e['id']:20s} {created:16s} {e['k']:>4d} {e['rows'] or 0:>7d} {e['bytes'] / 1e6:>8.2f} "
                   f"{e['bytes_per_position'] or 0:>6.1f}  {Path(e['teacher']).name}{flag} / "
                   f"{', '.join(e['experiments']) or '-'}")


@cache.command()
@click.argument("ref")
@BUCKET_ROOT
def show(ref, root):
    """The manifest of one score set (id, id prefix or path)."""
    click.echo(json.dumps(read_manifest(admin.find(root_location(root), ref)), indent=1))


@cache.command()
@click.argument("ref", required=False)
@BUCKET_ROOT
@JSON
def verify(ref, root, as_json):
    """Check every shard's checksum (one score set, or all); exit 1 when something is wrong."""
    root = root_location(root)
    paths = [admin.find(root, ref)] if ref else [location.as_location(e["path"]) for e in admin.entries(root)]
    report = {location.basename(p): admin.verify(p) for p in paths}
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        for name, problems in report.items():
            click.echo(f"{name}: {'ok' if not problems else '; '.join(problems)}")
        for path in (p for p in paths if report[location.basename(p)]):
            click.echo(f"repair: lopd cache repair {path}", err=True)
    if any(report.values()):
        raise SystemExit(1)


@cache.command()
@click.argument("ref")
@click.option("--teacher", default=None,
              help="Where the scoring teacher is now (default: the path its manifest records; it must be the same "
                   "model).")
@click.option("--experiment", envvar="LOPD_EXPERIMENT", default="default", show_default=True,
              help="Experiment name recorded in the cost ledger ($LOPD_EXPERIMENT).")
@BUCKET_ROOT
def repair(ref, teacher, experiment, root):
    """Rescore exactly the missing or corrupt shards of a score set (and finish an interrupted one)."""
    from lopd.score import repair as rescore

    root = writable_root(root)
    report_score(rescore(admin.find(root, ref), root, teacher=teacher, experiment=experiment))


@cache.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed.")
@click.option("--attempts-older-than", "attempts_hours", type=click.FloatRange(min=0),
              default=admin.ATTEMPTS_OLDER_THAN_HOURS, show_default=True, metavar="HOURS",
              help="On a bucket root, also remove write attempts no commit names (left by killed writers) once "
                   "their newest object is this many hours old; younger ones may belong to a writer still running.")
@BUCKET_ROOT
@JSON
def gc(dry_run, attempts_hours, root, as_json):
    """Remove score sets and rollout sets that no experiment in the ledger references, and on a bucket root the
    orphaned write attempts inside the sets kept."""
    removed = admin.collect(root_location(root), dry_run, attempts_hours)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "removed": [str(p) for p in removed]}, indent=1))
    else:
        verb = "would remove" if dry_run else "removed"
        for path in removed:
            click.echo(f"{verb} {path}")
        click.echo(f"{len(removed)} entries {verb}")


@cache.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["parquet"]), default="parquet", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@BUCKET_ROOT
def export(ref, fmt, out, root):
    """Export a score set joined with its rollouts as one Parquet table (one row per sequence)."""
    if Path(out).exists():
        raise LopdError(f"{out} already exists; choose another --out")
    click.echo(admin.export_parquet(admin.find(root_location(root), ref), Path(out)))
