"""Refreshing stale cache rows: re-roll their prompts with the current student (vLLM), re-score them with the
teacher (vLLM), and train on the new generation from then on.

This is the dial between Lightning OPD (never refresh: the cache of the SFT student's rollouts is reused to the
end, arXiv 2604.13010) and standard online OPD (`every_step`: each step's rows are re-sampled and re-scored
just before they are used). In between, `RefreshPolicy` thresholds on per-shard drift refresh only the shards
whose rollouts the student has moved away from. Each refresh is a new rollout set and score set (content
addressed, recorded in the ledger like any stage), listed in the run's `generations.json`.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopd.cache.reader import ScoreCache, open_cache
from lopd.engine import EnginePool
from lopd.rollout import SamplingConfig, rollout
from lopd.score import ScoreConfig, score
from lopd.storage import write_json_atomic
from lopd.train.data import SequenceDataset


@dataclass
class RefreshContext:
    """What a refreshing trainer needs beyond the cache: the teacher and engines to run it and the student on.

    `engine_args` are vLLM engine options for this run's engines on top of the pool's own (a pipeline stage's).
    """

    teacher: str
    pool: EnginePool
    root: Path
    experiment: str = "default"
    engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Refresher:
    cache: ScoreCache
    dataset: SequenceDataset
    context: RefreshContext
    work_dir: Path
    generations: list[dict[str, Any]] = field(default_factory=list)
    rollout_seconds: float = 0.0
    teacher_seconds: float = 0.0
    rows_refreshed: int = 0

    def shard_rows(self, shards: list[int]) -> list[int]:
        per = self.cache.manifest["rows_per_shard"]
        return [r for s in shards for r in range(s * per, min((s + 1) * per, len(self.cache)))]

    def refresh(self, rows: list[int], model, tokenizer, step: int, shards: list[int] | None = None) -> None:
        """Re-sample `rows` from the current student and re-score them; the dataset serves the new rows from now on."""
        student = self.work_dir / f"student-step{step:06d}"
        model.save_pretrained(student, safe_serialization=True)
        tokenizer.save_pretrained(student)
        original = self.cache.rollouts
        sampling = dict(original.meta["sampling"], n=1, seed=step)
        table = original.table
        prompts = [{"id": table.column("prompt_id")[r].as_py(), "prompt": table.column("prompt")[r].as_py(),
                    "answer": table.column("answer")[r].as_py(), "prompt_ids": original.prompt_ids[r]} for r in rows]
        start = time.perf_counter()
        pool, ctx = self.context.pool, self.context
        options = pool.options(ctx.engine_args)
        new_rollouts, _ = rollout(str(student), prompts, SamplingConfig(**sampling), root=ctx.root,
                                  verifier=original.meta.get("verifier") or None,
                                  llm=pool.get(str(student), ctx.engine_args), quiet=True, experiment=ctx.experiment,
                                  tool=(original.meta.get("tool") or {}).get("spec"), judge=original.meta.get("judge"),
                                  engine_args=options)
        self.rollout_seconds += time.perf_counter() - start
        config = self.cache.manifest["config"]
        scored = score(ctx.teacher, new_rollouts, ScoreConfig(k=config["k"], logprob_dtype=config["logprob_dtype"],
                                                              rows_per_shard=max(len(rows), 1)),
                       root=ctx.root, llm=pool.get(ctx.teacher, ctx.engine_args), quiet=True, experiment=ctx.experiment,
                       engine_args=options)
        self.teacher_seconds += scored.teacher_seconds
        fresh = open_cache(scored.path)
        for j, row in enumerate(rows):
            self.dataset.replace(row, fresh, j)
        self.rows_refreshed += len(rows)
        self.generations.append({"step": step, "shards": shards, "rows": len(rows), "rollout_set": new_rollouts.id,
                                 "score_set": scored.id})
        write_json_atomic(self.work_dir / "generations.json", self.generations)
        for stale in self.work_dir.glob("student-step*"):  # keep only the latest refresh checkpoint
            if stale != student:
                shutil.rmtree(stale, ignore_errors=True)

    def summary(self) -> dict[str, float]:
        return {"refreshes": len(self.generations), "rows_refreshed": self.rows_refreshed,
                "refresh_rollout_seconds": round(self.rollout_seconds, 2),
                "refresh_teacher_seconds": round(self.teacher_seconds, 2)}
