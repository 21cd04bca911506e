"""Resumable training checkpoints under OUT/checkpoints, and the bookkeeping that makes a rerun continue a run.

A run is preemptible only if a killed process leaves nothing half-written and the rerun reproduces exactly
what the uninterrupted run would have done. So a checkpoint is written with DeepSpeed's own API (model,
optimizer and scheduler, partitioned under ZeRO-2/3) into a hidden `.partial-*` directory, each rank adds
its own trainer state (RNG streams, micro-batches consumed, metric windows, drift sums), and only then is
the directory renamed to `step-NNNNNNNN`: a rename is atomic, so a `step-*` directory is always complete.

Rerunning the same command finds the newest `step-*`, refuses it when the run's identity (configuration,
inputs, world size) differs, and otherwise restores everything, truncates `metrics.jsonl` and `drift.jsonl`
to the checkpoint's step (rows written after it would be written again), and re-positions the data stream by
skipping the micro-batches already consumed (lopd.train.trainer.offline_batches).

Cost ledger rule: every attempt records its own row with its own wall and device seconds (a killed
attempt cannot write its row, so the next attempt writes it from the heartbeat the killed one left in
`attempt.json`); an attempt's `tokens` are the tokens of the steps it trained that no later attempt redoes,
i.e. up to its last checkpoint if it did not finish. Summed over attempts, tokens count every trained token
once, while device seconds include the work a kill threw away, because that time was spent.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lopd.cache.reader import ScoreCache, open_cache
from lopd.cost.ledger import StageRecord, append_row
from lopd.errors import LopdError
from lopd.faults import crash_point
from lopd.storage import read_json, write_json_atomic
from lopd.train import distributed
from lopd.train.config import TrainConfig
from lopd.train.drift import DriftStats, ShardDrift
from lopd.train.refresh import Refresher

CHECKPOINTS = "checkpoints"
TAG = "state"  # DeepSpeed's tag directory inside each checkpoint
META = "lopd_checkpoint.json"
ATTEMPT = "attempt.json"

FREE_TO_CHANGE = ("save_every", "keep_checkpoints", "log_every", "report_to", "skip_nonfinite")
"""Options a resumed run may change: they decide what is written or whether a bad step stops the run, not what is
learnt (--skip-nonfinite exists precisely to resume past a step that stopped a run)."""
LENGTH_OPTIONS = ("steps", "epochs")
"""May change only under a constant schedule, whose learning rate does not depend on the total number of steps."""


def run_identity(config: TrainConfig, student: str, inputs: list[str], world: int, key: str | None = None
                 ) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it, as JSON values. `key` stands for what the caller
    knows and TrainConfig does not (a pipeline stage's key covers its online sampler's settings, for one)."""
    return json.loads(json.dumps({"config": asdict(config), "student": student, "inputs": inputs, "world_size": world,
                                  "key": key}, default=str))


def identity_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first difference that makes resuming mix two runs, as 'what: old -> new'; None when resumable."""
    for key in ("student", "inputs", "world_size", "key"):
        if saved[key] != current[key]:
            return f"{key}: {saved[key]} -> {current[key]}"
    old, new = saved["config"], current["config"]
    for key in sorted(set(old) | set(new)):
        if key in FREE_TO_CHANGE or old.get(key) == new.get(key):
            continue
        if key in LENGTH_OPTIONS and new.get("lr_schedule") == "constant":
            continue
        return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


class Checkpoints:
    """The resumable checkpoints of one output directory."""

    def __init__(self, out_dir: Path, identity: dict[str, Any], keep: int):
        self.dir = Path(out_dir) / CHECKPOINTS
        self.identity = identity
        self.keep = keep
        # A LoRA run saves only its trainable weights: the frozen base model is the student it starts from anyway.
        self.frozen_excluded = bool(identity["config"]["lora_rank"])

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a `.partial-*` directory is one a kill interrupted)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if (p / META).is_file())

    def find(self, restart_on_change: bool = False) -> Path | None:
        """The checkpoint to resume from, after checking it belongs to this run (rank 0 calls this before any model
        loads, so a refusal is immediate). `restart_on_change` deletes another run's checkpoints instead of refusing:
        pipelines, whose state file has already decided the stage must run again."""
        found = self.complete()
        if not found:
            return None
        latest = found[-1]
        saved = read_json(latest / META)
        change = identity_change(saved["identity"], self.identity)
        if change is not None:
            if restart_on_change:
                shutil.rmtree(self.dir)
                return None
            raise LopdError(f"{latest} was written by a different run ({change}); rerun with the same options to "
                            f"resume it, or delete {self.dir} (or pass another --out) to start over")
        steps = self.identity["config"]["steps"]
        if steps is not None and saved["step"] > steps:
            raise LopdError(f"{latest} is at step {saved['step']}, beyond --steps {steps}: pass --steps >= "
                            f"{saved['step']}, or delete {self.dir} to start over")
        return latest

    def save(self, engine, step: int, rank_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` atomically (every rank calls this) and delete all but the newest `keep`."""
        final = self.dir / f"step-{step:08d}"
        partial = self.dir / f".partial-step-{step:08d}"
        if distributed.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(partial), tag=TAG, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=self.frozen_excluded)
        torch.save({**rank_state, "rng": rng_state()}, partial / TAG / f"lopd_rank{distributed.rank()}.pt")
        barrier()
        if distributed.rank() == 0:
            write_json_atomic(partial / META, {"step": step, "identity": self.identity, "saved_at": time.time()})
            crash_point("checkpoint_rename")
            os.replace(partial, final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, engine, path: Path) -> dict[str, Any]:
        """Restore model, optimizer and scheduler into `engine`; returns this rank's trainer state (with `rng`, which
        `restore_rng` applies once everything that draws random numbers at start-up has run)."""
        load_path, client = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=not self.frozen_excluded)
        if load_path is None:
            raise LopdError(f"DeepSpeed could not load {path}: delete it to resume from the checkpoint before it")
        state = torch.load(path / TAG / f"lopd_rank{distributed.rank()}.pt", weights_only=False)
        state["step"] = client["step"]
        return state

    def clear_partial(self) -> None:
        """Remove what an interrupted save left (rank 0, before training starts)."""
        for partial in self.dir.glob(".partial-*") if self.dir.is_dir() else ():
            shutil.rmtree(partial, ignore_errors=True)


def barrier() -> None:
    if distributed.world_size() > 1:
        torch.distributed.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loop_state(*, micro_batches: int, tokens: int, seconds: float, window: dict[str, list[float]], skipped: int,
               drift: ShardDrift, refresher: Refresher | None, live, report_id: str) -> dict[str, Any]:
    """This rank's trainer state at a step boundary: what the loop needs, besides the engine, to continue exactly.
    `live` is the trainer's live batch source, if any: one with `state_dict` (OnlineSampler) resumes its stream."""
    state = {"micro_batches": micro_batches, "tokens": tokens, "seconds": seconds, "window": window,
             "nonfinite_skipped": skipped, "report_id": report_id,
             "drift": {"overall": drift.overall.sums, "shards": {s: d.sums for s, d in drift.shards.items()}}}
    if hasattr(live, "state_dict"):
        state["live"] = live.state_dict()
    if refresher is not None:  # which rows are served from which refreshed score set, and the refresh totals
        state["refresh"] = {
            "replaced": {row: (str(cache.path), j) for row, (cache, j) in refresher.dataset.replaced.items()},
            "generations": refresher.generations, "rollout_seconds": refresher.rollout_seconds,
            "teacher_seconds": refresher.teacher_seconds, "rows_refreshed": refresher.rows_refreshed}
    return state


def restore_loop_state(state: dict[str, Any], drift: ShardDrift, refresher: Refresher | None, live) -> None:
    """Put the drift sums, refreshed rows and live source's state of `state` (from `loop_state`) back."""
    if "live" in state:
        live.load_state_dict(state["live"])
    drift.overall = DriftStats(dict(state["drift"]["overall"]))
    drift.shards = {s: DriftStats(dict(sums)) for s, sums in state["drift"]["shards"].items()}
    if refresher is not None and "refresh" in state:
        saved = state["refresh"]
        caches: dict[str, ScoreCache] = {}
        for row, (path, j) in saved["replaced"].items():
            refresher.dataset.replace(row, caches.setdefault(path, open_cache(path)), j)
        refresher.generations = list(saved["generations"])
        refresher.rollout_seconds, refresher.teacher_seconds = saved["rollout_seconds"], saved["teacher_seconds"]
        refresher.rows_refreshed = saved["rows_refreshed"]


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of `path` up to `step` (a resumed run writes the later ones again); atomic. A line that does not
    parse is the torn last line of a process killed mid-write, and goes too."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if (n := _step_of(line)) is not None and n <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class Attempt:
    """One run of the command against an output directory (rank 0): a heartbeat in OUT/attempt.json, from which the
    next attempt writes the ledger row of an attempt that was killed, and the tokens its own row may claim."""

    def __init__(self, out_dir: Path, record: StageRecord):
        self.path = Path(out_dir) / ATTEMPT
        self.record = record
        self.start_tokens = 0
        self.started_at = time.time()
        self.alive(0)

    def resumed(self, step: int, tokens: int) -> None:
        """The attempt continues a checkpoint at cumulative `tokens`: its row counts only the tokens after it."""
        self.start_tokens = tokens
        self.alive(step)

    @staticmethod
    def recover_killed(out_dir: Path, root, fields: dict[str, Any]) -> None:
        """Append the ledger row (`fields` plus its times and tokens) of an earlier attempt that was killed before it
        could write it: its heartbeat is still there."""
        path = Path(out_dir) / ATTEMPT
        if not path.is_file():
            return
        beat = read_json(path)
        append_row(root, {**fields, "started_at": beat["started_at"], "ended_at": beat["last_seen"],
                          "tokens": beat["tokens"], "extra": {"outcome": "killed", "step": beat["step"]}})
        path.unlink()

    def alive(self, step: int) -> None:
        write_json_atomic(self.path, {"started_at": self.started_at, "last_seen": time.time(),
                                      "tokens": self.record.tokens, "step": step})

    def checkpointed(self, step: int, tokens: int) -> None:
        """A checkpoint at cumulative `tokens` survives a kill: this attempt's row may claim the tokens up to it."""
        self.record.tokens = tokens - self.start_tokens
        self.alive(step)

    def finished(self, tokens: int) -> None:
        self.record.tokens = tokens - self.start_tokens

    def end(self) -> None:
        """The attempt ends in this process (finished or raised), so its own row is written: no heartbeat to recover."""
        self.path.unlink(missing_ok=True)
