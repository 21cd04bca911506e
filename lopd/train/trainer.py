"""`lopd train`: DeepSpeed training of a student from cached rollouts and teacher signals with a registered loss.

One loop serves every loss: batches come from the cache (offline) or from a live sampler (the online
baseline); the loss is a pure function of response-aligned tensors (lopd.losses). The student's own
log-prob of each cached token is compared with the behaviour log-prob recorded at rollout time, so the
metrics show how far the student has drifted from the policy that produced the cache.
"""
from __future__ import annotations

import json
import math
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch
from tqdm import tqdm

from lopd.cache.reader import ScoreCache
from lopd.cost.ledger import record_stage
from lopd.errors import LopdError
from lopd.faults import crash_point
from lopd.fingerprint import model_fingerprint
from lopd.losses import get_loss
from lopd.losses.base import LossInputs, LossOutput, LossSpec
from lopd.losses.student import StudentLogprobs, StudentRequest
from lopd.losses.topk import teacher_kl
from lopd.models.guards import check_training_inputs
from lopd.models.lineage import read_lineage, write_lineage
from lopd.models.loading import resolve_model
from lopd.rollout_set import RolloutSet
from lopd.train import alignment
from lopd.train import distributed
from lopd.train.checkpoint import (Attempt, Checkpoints, loop_state, restore_loop_state, restore_rng, run_identity,
                                  truncate_jsonl)
from lopd.train.config import TrainConfig
from lopd.train.data import Batch, SequenceDataset, available_fields, collate
from lopd.train.drift import DriftStats, RefreshPolicy, ShardDrift, token_drift
from lopd.train.nonfinite import nonfinite_message
from lopd.train.refresh import Refresher, RefreshContext
from lopd.train.reporting import Reporter
from lopd.train.sampling import GroupBatchSampler, ShardWindowSampler, split_by_tokens
from lopd.train.student_head import StudentHead, load_student


MERGED_DIR = "merged"
"""Subdirectory of a LoRA checkpoint holding the merged full model (`--merge-lora`)."""


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    tokens: int
    seconds: float
    final_metrics: dict[str, float]
    refresh: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0  # the checkpoint step this attempt continued (0: a fresh run)

    @property
    def model(self) -> Path:
        """What vLLM or transformers loads: the merged full model of a `--merge-lora` run, else the checkpoint."""
        merged = self.checkpoint / MERGED_DIR
        return merged if merged.is_dir() else self.checkpoint


def deepspeed_config(config: TrainConfig, world: int) -> dict[str, Any]:
    """DeepSpeed's config for these options. With a token budget the number of micro-batches per step varies, so
    DeepSpeed's own accumulation count is off (`managed_gradient_accumulation`: every `step()` is a boundary) and
    the trainer weights each micro-batch's loss itself (`step_weights`)."""
    micro = config.micro_batch_size or max(1, config.batch_size // world)
    if config.batch_size % (micro * world):
        raise LopdError(f"--batch-size {config.batch_size} is not a multiple of micro batch {micro} x {world} ranks")
    token_budget = {"managed_gradient_accumulation": False} if config.max_tokens_per_micro_batch else {}
    return {
        "train_batch_size": config.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": config.batch_size // (micro * world),
        **token_budget,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def teacher_consistency(student: str, cache: ScoreCache, allow: bool) -> dict[str, Any]:
    """Whether the cache's teacher wrote the student's SFT data (None: the student records no SFT data model),
    and whether the user overrode the guard: the checkpoint's lineage keeps it, so an inconsistent run (e.g. a
    teacher-consistency experiment) stays recognisable as one."""
    sft_teacher = read_lineage(student).get("sft_data_model")
    scorer = cache.manifest["teacher"]["fingerprint"]
    return {"sft_data_model": sft_teacher, "scored_by": scorer,
            "consistent": None if not sft_teacher else sft_teacher == scorer, "override": allow}


def check_teacher_consistency(student: str, cache: ScoreCache, allow: bool) -> None:
    """Lightning OPD is unbiased only if the teacher that scores is the one that wrote the student's SFT data."""
    record = teacher_consistency(student, cache, allow)
    if record["consistent"] is False and not allow:
        raise LopdError(
            f"the cache's teacher ({record['scored_by']}) is not the model that produced this student's SFT data "
            f"({record['sft_data_model']}); offline OPD assumes teacher consistency (arXiv 2604.13010): score with "
            "the SFT teacher, or pass --allow-teacher-mismatch"
        )


class HookedBatchSampler:
    """Yields each micro-batch's row indices after calling `before(rows)`: the point where an every-step
    refresh re-samples exactly the rows about to be trained on, before the DataLoader reads them."""

    def __init__(self, batches, before: Callable[[list[int]], None] | None):
        self.batches = batches
        self.before = before

    def __iter__(self):
        for rows in self.batches:
            if self.before is not None:
                self.before(rows)
            yield rows

    def __len__(self) -> int:
        return len(self.batches)


def offline_batches(dataset: SequenceDataset, config: TrainConfig, micro: int, accumulation: int, pad_id: int,
                    before: Callable[[list[int]], None] | None = None, grouped: bool = False,
                    skip: int = 0) -> Iterator[list[Batch]]:
    """Shuffled optimizer steps over the cache, each a list of micro-batches, epoch after epoch, each rank its own
    slice, read through a DataLoader.

    A step is `accumulation` micro-batches of `micro` rows, or, with `config.max_tokens_per_micro_batch`, the
    step's `micro * accumulation` rows split by that token budget, longest rows first (`split_by_tokens`).
    `grouped`: micro-batches of whole groups (the rollouts of one prompt), for group-relative losses.
    `skip`: micro-batches already trained on (a resumed run). Each epoch's order is a function of the seed and the
    epoch alone, so it is recomputed and the first `skip` batches are passed over by their row indices, unread.
    The DataLoader gets its own generator: drawing its base seed from the global one would shift the RNG stream
    of a resumed run against an uninterrupted one.
    """
    from torch.utils.data import BatchSampler, DataLoader

    budget = config.max_tokens_per_micro_batch
    rows = micro * accumulation if budget else micro  # what the sampler hands out at once: a step, or a micro-batch
    row_shards, window = dataset.row_shards()  # shuffle within windows of the shards the reader keeps decoded
    group_ids = dataset.rollouts.group_ids if grouped else None
    if grouped:
        batches = GroupBatchSampler(group_ids, rows, distributed.rank(), distributed.world_size(), config.seed,
                                    row_shards, window)
        set_epoch = batches.set_epoch
    else:
        sampler = ShardWindowSampler(row_shards, window, distributed.rank(), distributed.world_size(), config.seed)
        batches, set_epoch = BatchSampler(sampler, rows, drop_last=False), sampler.set_epoch
    lengths = dataset.sequence_lengths() if budget else None
    epoch = 0
    while True:
        set_epoch(epoch)
        if budget:
            steps = [split_by_tokens(step, lengths, budget, group_ids) for step in batches]
        else:
            flat = list(batches)
            steps = [flat[i:i + accumulation] for i in range(0, len(flat), accumulation)]
        order = [rows for step in steps for rows in step]
        ends = {sum(len(step) for step in steps[:i + 1]) - 1 for i in range(len(steps))}
        if skip < len(order):
            loader = DataLoader(dataset, batch_sampler=HookedBatchSampler(order[skip:], before),
                                collate_fn=partial(collate, pad_id=pad_id), generator=torch.Generator())
            step: list[Batch] = []
            for index, batch in enumerate(loader, start=skip):
                step.append(batch)
                if index in ends:
                    yield step
                    step = []
        skip = max(0, skip - len(order))
        epoch += 1


def in_steps(stream: Iterator[Batch], accumulation: int) -> Iterator[list[Batch]]:
    """A live micro-batch source grouped into optimizer steps of `accumulation` micro-batches."""
    while True:
        yield [next(stream) for _ in range(accumulation)]


def lr_factor(config: TrainConfig, total_steps: int, step: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule
    (constant, or linear / cosine decay to 0 at the last step)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def steps_for(config: TrainConfig, num_rows: int) -> int:
    return config.steps or max(1, math.ceil(config.epochs * num_rows / config.batch_size))


def train(
    student: str,
    source: ScoreCache | RolloutSet | None,
    config: TrainConfig,
    out_dir: Path,
    *,
    batches: Callable[[torch.nn.Module], Iterator[Batch]] | None = None,
    quiet: bool = False,
    root: Path | None = None,
    experiment: str = "default",
    attached: dict[str, ScoreCache] | None = None,
    refresh_context: RefreshContext | None = None,
    restart_on_change: bool = False,
    run_key: str | None = None,
) -> TrainResult:
    """Train `student` on `source`, or on `batches(model)` from a live sampler, and save a HF checkpoint to `out_dir`.

    With `config.refresh` thresholds (and a `refresh_context` naming the teacher and engines), stale cache shards
    are re-rolled and re-scored during training (lopd.train.refresh). `attached` maps LossInputs fields to further score
    sets over the same rollouts (lopd.train.data.ATTACHABLE: G-OPD's base model, RLCSD's contrast).
    A run whose `out_dir` holds a resumable checkpoint of the same run continues from it (lopd.train.checkpoint);
    one of another run is refused, or deleted with `restart_on_change`; `run_key` adds to what "the same run" means
    (a pipeline stage's key).
    """
    attached = dict(attached or {})
    student = resolve_model(student)
    spec: LossSpec = get_loss(config.loss)
    loss_args = spec.resolve_args(config.loss_args)
    policy = RefreshPolicy(**config.refresh)
    if policy.enabled and (not isinstance(source, ScoreCache) or refresh_context is None):
        raise LopdError("cache refresh needs a score set (--cache) and the teacher that scored it")
    if source is not None:
        check_training_inputs(student, source, allow_lineage_mismatch=config.allow_lineage_mismatch)
    if isinstance(source, ScoreCache):
        check_teacher_consistency(student, source, config.allow_teacher_mismatch)
    if source is not None:
        spec.check_inputs(available_fields(source, attached))
    alignment.check_token_filter(config.token_filter, source, refresh=policy.enabled, signal=config.token_filter_signal)

    inputs = [student]
    if isinstance(source, ScoreCache):
        inputs += [source.id, source.rollouts.id] + [cache.id for cache in attached.values()]
    elif isinstance(source, RolloutSet):
        inputs += [source.id]
    deepspeed = distributed.init_process_group()
    out_dir = Path(out_dir)
    checkpoints = Checkpoints(out_dir, run_identity(config, student, inputs, distributed.world_size(), run_key),
                              config.keep_checkpoints)
    resume = [checkpoints.find(restart_on_change) if distributed.rank() == 0 else None]
    if distributed.world_size() > 1:
        torch.distributed.broadcast_object_list(resume)
    run = partial(_train, student, source, config, spec, loss_args, out_dir, batches, quiet, deepspeed, attached,
                  refresh_context, checkpoints, resume[0])
    if distributed.rank() != 0:
        return run(None)
    fields = {"experiment": experiment, "stage": "sft" if config.loss == "sft" else "train", "method": config.loss,
              "artifact": str(out_dir.resolve()), "inputs": inputs}
    devices = {"device_count": distributed.world_size()} if distributed.world_size() > 1 else {}
    Attempt.recover_killed(out_dir, root, {**fields, **devices})
    with record_stage(root, **fields, open_run=False) as rec:  # a killed attempt: Attempt.recover_killed
        rec.device_count = devices.get("device_count")
        attempt = Attempt(out_dir, rec)
        try:
            result = run(attempt)
        finally:
            attempt.end()
        rec.extra = {"steps": result.steps, "resumed_from": result.resumed_from, **result.refresh}
    return result


def _train(student, source, config: TrainConfig, spec: LossSpec, loss_args, out_dir: Path, batches, quiet,
           deepspeed, attached: dict[str, ScoreCache], refresh_context: RefreshContext | None, checkpoints: Checkpoints,
           resume: Path | None, attempt: Attempt | None) -> TrainResult:
    """Set up the engine, data and outputs, run the step loop (`TrainLoop.run`), save the model. Every rank runs it;
    rank 0 also writes metrics and the checkpoint, and keeps the `attempt`'s heartbeat."""
    from transformers import AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = load_student(student, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    ds_config = deepspeed_config(config, distributed.world_size())
    total_steps = steps_for(config, len(source)) if source is not None else (config.steps or 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, config, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    state = checkpoints.load(engine, resume) if resume is not None else {}
    start_step = state.get("step", 0)
    if state and not quiet and distributed.rank() == 0:
        tqdm.write(f"resuming from {resume} (step {start_step} of {total_steps})", file=sys.stderr)

    micro = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config["gradient_accumulation_steps"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = RefreshPolicy(**config.refresh)
    token_filter = alignment.build_token_filter(config.token_filter, source, spec, loss_args, config.token_filter_signal)
    drift = ShardDrift(source.manifest["rows_per_shard"] if isinstance(source, ScoreCache) else 1 << 62)
    refresher = None
    if batches is not None:
        stream = in_steps(batches(engine.module.lm), accumulation)
    else:
        dataset = SequenceDataset(source, attached)
        if policy.enabled:
            if distributed.world_size() > 1 or config.zero_stage == 3:
                raise LopdError("cache refresh runs in one process with ZeRO stage <= 2 for now")
            refresher = Refresher(source, dataset, refresh_context, out_dir / "refresh")
        before = None
        if refresher is not None and policy.every_step:
            before = lambda rows: loop.refresh_rows(rows)  # called in the loop, once `loop` exists
        stream = offline_batches(dataset, config, micro, accumulation, pad_id, before,
                                 grouped="group_ids" in spec.needs, skip=state.get("micro_batches", 0))

    is_main = distributed.rank() == 0
    if is_main:
        checkpoints.clear_partial()
        for name in ("metrics.jsonl", "drift.jsonl"):
            truncate_jsonl(out_dir / name, start_step)
    mode = "a" if resume is not None else "w"
    metrics_file = (out_dir / "metrics.jsonl").open(mode) if is_main else None
    drift_file = (out_dir / "drift.jsonl").open(mode) if is_main and isinstance(source, ScoreCache) else None
    report_id = state.get("report_id") or uuid.uuid4().hex[:16]  # one W&B run across the attempts of a run
    reporter = Reporter(config.report_to, out_dir, config, report_id, start_step) if is_main else None
    if state:
        restore_loop_state(state, drift, refresher, batches)
        restore_rng(state["rng"])
    if attempt is not None:
        attempt.resumed(start_step, state.get("tokens", 0))
    engine.train()
    loop = TrainLoop(
        config=config, spec=spec, loss_args=loss_args, policy=policy, engine=engine, scheduler=scheduler,
        tokenizer=tokenizer, stream=stream, student_request=spec.student_request(loss_args),
        token_filter=token_filter, drift=drift, refresher=refresher, live=batches, checkpoints=checkpoints,
        attempt=attempt, metrics_file=metrics_file, drift_file=drift_file, reporter=reporter,
        bar=tqdm(total=total_steps, initial=start_step, desc=f"train {config.loss}", unit="step",
                 disable=quiet or not is_main),
        total_steps=total_steps, report_id=report_id, step=start_step, logged=start_step,
        start=time.perf_counter() - state.get("seconds", 0.0), tokens_seen=state.get("tokens", 0),
        consumed=state.get("micro_batches", 0), skipped=state.get("nonfinite_skipped", 0),
        window=state.get("window", {}))
    loop.run()
    seconds = time.perf_counter() - loop.start
    for f in (metrics_file, drift_file, reporter):
        if f:
            f.close()
    save_checkpoint(engine, tokenizer, out_dir, config, student, source)
    if attempt is not None:
        attempt.finished(loop.tokens_seen)
    return TrainResult(out_dir, total_steps, loop.tokens_seen, seconds, loop.last,
                       refresher.summary() if refresher else {}, start_step)


PHASES = ("data", "refresh", "forward_backward", "step", "checkpoint")
"""The timed phases of a training step; each metrics row reports `time/<phase>`."""


class Phases:
    """Wall seconds spent in each phase of the step loop since the last metrics row: where a step's time goes
    (reading data, refreshing the cache, the model, the optimizer, checkpoints) without a profiler. A phase timed
    inside another counts to the inner one alone (the every-step refresh runs while the data loader reads a
    micro-batch; DeepSpeed steps the optimizer inside each fixed-size micro-batch), so the phases add up to the
    loop's time."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.open: list[list[float]] = []  # [start, seconds of phases nested in it] of each phase being timed

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        frame = [time.perf_counter(), 0.0]
        self.open.append(frame)
        try:
            yield
        finally:
            self.open.pop()
            elapsed = time.perf_counter() - frame[0]
            self.seconds[name] += elapsed - frame[1]
            if self.open:
                self.open[-1][1] += elapsed

    def row(self, steps: int) -> dict[str, float]:
        """Each phase's mean seconds per step over the `steps` steps since the last row; the count starts over."""
        row = {f"time/{name}": round(seconds / steps, 6) for name, seconds in self.seconds.items()}
        self.seconds = dict.fromkeys(PHASES, 0.0)
        return row


@dataclass
class StepOutcome:
    """What a step's micro-batches leave for its update: their tokens, and the message for its first NaN/inf loss."""
    tokens: int = 0
    nonfinite: str | None = None


@dataclass
class TrainLoop:
    """The step loop and the state it carries from step to step (the data position, token and skip counts, the
    metric window: what a checkpoint saves besides the engine). `run` reads as the recipe; each concern is a method."""
    config: TrainConfig
    spec: LossSpec
    loss_args: dict[str, Any]
    policy: RefreshPolicy
    engine: Any  # DeepSpeed's engine around the StudentHead
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: Any
    stream: Iterator[list[Batch]]  # optimizer steps, each a list of micro-batches
    student_request: StudentRequest
    token_filter: alignment.AlignedTokenFilter | None
    drift: ShardDrift
    refresher: Refresher | None
    live: Any  # the live batch source (online baseline), whose state checkpoints keep; None offline
    checkpoints: Checkpoints
    attempt: Attempt | None
    metrics_file: IO[str] | None  # rank 0 only, like drift_file and reporter
    drift_file: IO[str] | None
    reporter: Reporter | None
    bar: tqdm
    total_steps: int
    report_id: str
    step: int  # the step being trained
    logged: int  # the step of the last metrics row
    start: float  # perf_counter() at the start of the run, earlier attempts' seconds included
    tokens_seen: int
    consumed: int  # micro-batches read so far: where a resumed run's data continues
    skipped: int  # steps dropped as non-finite (--skip-nonfinite)
    window: dict[str, list[float]]  # metric values since the last row
    last: dict[str, float] = field(default_factory=dict)  # the last row's window means
    timed: Phases = field(default_factory=Phases)

    def run(self) -> None:
        """The recipe: each step reads its micro-batches, trains on them, updates the weights, refreshes stale cache
        shards, logs and checkpoints, every phase timed into the metrics."""
        for step in range(self.step + 1, self.total_steps + 1):
            self.step = step
            with self.timed("data"):
                micro_batches = self.next_step()
            with self.timed("forward_backward"):
                outcome = self.forward_backward(micro_batches)
            with self.timed("step"):
                self.optimizer_step(outcome)
            with self.timed("refresh"):
                self.maybe_refresh()
            self.log_metrics()
            with self.timed("checkpoint"):
                self.maybe_checkpoint()
            crash_point("train_step")
        self.bar.close()

    def next_step(self) -> list[Batch]:
        """The step's micro-batches, counted so that a resumed run's data continues after them."""
        micro_batches = next(self.stream)
        self.consumed += len(micro_batches)
        return micro_batches

    def refresh_rows(self, rows: list[int]) -> None:
        """The every-step refresh: re-sample and re-score exactly the rows about to be trained on, as the data loader
        reads them (HookedBatchSampler)."""
        with self.timed("refresh"):
            self.refresher.refresh(list(rows), self.engine.module.lm, self.tokenizer, self.step)

    def forward_backward(self, micro_batches: list[Batch]) -> StepOutcome:
        """Forward and backward of each micro-batch, plus the zero-weight repeats that keep ranks in lockstep
        (`step_weights`); only the real micro-batches count their tokens, drift and metrics."""
        outcome = StepOutcome()
        weights = step_weights(micro_batches, self.config)
        padded = micro_batches + micro_batches[-1:] * (len(weights) - len(micro_batches))
        for index, (batch, weight) in enumerate(zip(padded, weights)):
            batch = batch.to(self.engine.device)
            inputs, out = self.backward(batch, weight)
            if index < len(micro_batches):
                self.count(batch, inputs, out, outcome)
        return outcome

    def backward(self, batch: Batch, weight: float) -> tuple[LossInputs, LossOutput]:
        """One micro-batch's loss and backward; returns the unfiltered inputs (drift keeps every token, only the loss
        sees the token filter) and the loss. A token-budget step weights each loss and steps once at its end
        (`optimizer_step`); fixed micro-batches step DeepSpeed after each backward, which updates at its
        accumulation boundary."""
        request = replace(self.student_request, topk_overlap=topk_width(batch))
        inputs = batch.loss_inputs(self.engine(batch, request))
        filtered_inputs = inputs
        if self.token_filter is not None:
            filtered_inputs, filtered = filter_tokens(self.token_filter, self.engine.module, batch, inputs)
            for key, value in filtered.items():
                self.add(key, value)
        out = self.spec.fn(filtered_inputs, **self.loss_args)
        if self.config.max_tokens_per_micro_batch:
            self.engine.backward(out.loss * weight, scale_wrt_gas=False)
        else:
            self.engine.backward(out.loss)
            with self.timed("step"):
                self.engine.step()
        return inputs, out

    def count(self, batch: Batch, inputs: LossInputs, out: LossOutput, outcome: StepOutcome) -> None:
        """A trained micro-batch's tokens, its drift from the behaviour policy (untempered), its KL to the teacher's
        top-k (`teacher_kl`, whatever the loss, so every method's distance to the teacher is comparable) and its loss
        metrics, unless the loss is NaN/inf: then the step's first such loss is what `optimizer_step` reports."""
        outcome.tokens += batch.num_tokens
        plain = untempered(inputs, self.engine.module, batch)
        self.drift.add(token_drift(plain, self.policy.band),
                       batch.rows if batch.rows is not None else torch.zeros(len(batch.input_ids), dtype=torch.long))
        if topk_width(batch):
            self.add("teacher_kl", teacher_kl(plain).item())
        loss = out.loss.item()
        if not math.isfinite(loss):
            outcome.nonfinite = outcome.nonfinite or nonfinite_message(self.step, self.config.loss, "loss", batch)
            return
        for key, value in {"loss": loss, **out.metrics}.items():
            self.add(key, value)

    def optimizer_step(self, outcome: StepOutcome) -> None:
        """End the step: a token-budget step's one accumulation boundary, then the non-finite check. DeepSpeed drops
        an update whose gradient is not finite (its overflow check), so a NaN/inf loss or gradient norm must not
        pass silently: it stops the run with its cause, or is counted under --skip-nonfinite. Only finite steps
        count their tokens and gradient norm."""
        if self.config.max_tokens_per_micro_batch:
            self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()  # None under ZeRO-0 in fp32, which computes none
        nonfinite = outcome.nonfinite
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            nonfinite = nonfinite or nonfinite_message(self.step, self.config.loss, "gradient norm", None)
        if nonfinite is not None:
            if not self.config.skip_nonfinite:
                self.bar.close()
                raise LopdError(nonfinite)
            self.skipped += 1
            return
        self.tokens_seen += outcome.tokens
        if grad_norm is not None:
            self.add("grad_norm", float(grad_norm))

    def maybe_refresh(self) -> None:
        """The threshold refresh, every `check_every` steps: re-roll and re-score the shards whose drift crossed the
        policy's thresholds (noting which, and why, in drift.jsonl) and restart their drift sums."""
        if self.refresher is None or self.policy.every_step or self.step % self.policy.check_every:
            return
        stale = self.policy.stale(self.drift)
        if not stale:
            return
        if self.drift_file:
            self.drift_file.write(json.dumps({"step": self.step, "refresh": stale, "shards": {
                s: self.drift.shards[s].summary() for s in stale}}) + "\n")
        self.refresher.refresh(self.refresher.shard_rows(stale), self.engine.module.lm, self.tokenizer, self.step,
                               stale)
        self.drift.reset(stale)

    def log_metrics(self) -> None:
        """Every `log_every` steps and at the last: the window's means, drift, throughput, learning rate, refresh
        totals and phase times as a metrics.jsonl row (and to the reporting backend), each shard's drift as a
        drift.jsonl row, the progress bar's numbers and the attempt's heartbeat."""
        if self.step % self.config.log_every == 0 or self.step == self.total_steps:
            self.write_row()
        self.bar.update(1)

    def write_row(self) -> None:
        """The row of `log_metrics`; the window and overall drift start over."""
        elapsed = time.perf_counter() - self.start
        self.last = {k: sum(v) / len(v) for k, v in self.window.items()}
        self.last.update(self.drift.overall.summary())
        self.drift.overall = DriftStats()
        self.window.clear()
        record = {"step": self.step, **{k: round(v, 6) for k, v in self.last.items()},
                  "tokens": self.tokens_seen, "tokens_per_s": round(self.tokens_seen / elapsed, 1),
                  "lr": self.scheduler.get_last_lr()[0], **(self.refresher.summary() if self.refresher else {}),
                  **self.timed.row(self.step - self.logged)}
        self.logged = self.step
        if self.config.skip_nonfinite:
            record["nonfinite_skipped"] = self.skipped
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            self.reporter.log(self.step, record)
            self.attempt.alive(self.step)
        if self.drift_file:
            self.drift_file.write(json.dumps({"step": self.step, "shards": {
                s: d.summary() for s, d in sorted(self.drift.shards.items())}}) + "\n")
            self.drift_file.flush()
        postfix = {"loss": f"{self.last.get('loss', math.nan):.4f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if "kl" in self.last:
            postfix.update(kl=f"{self.last['kl']:.3f}", w=f"{self.last['importance_weight']:.3f}")
        if self.refresher:
            postfix["refreshes"] = len(self.refresher.generations)
        self.bar.set_postfix(postfix)

    def maybe_checkpoint(self) -> None:
        """A resumable checkpoint every `save_every` steps and at the last: the engine plus what this loop needs to
        continue exactly (lopd.train.checkpoint.loop_state)."""
        if not (self.step == self.total_steps or (self.config.save_every and self.step % self.config.save_every == 0)):
            return
        self.checkpoints.save(self.engine, self.step, loop_state(
            micro_batches=self.consumed, tokens=self.tokens_seen, seconds=time.perf_counter() - self.start,
            window=self.window, skipped=self.skipped, drift=self.drift, refresher=self.refresher, live=self.live,
            report_id=self.report_id))
        if self.attempt is not None:
            self.attempt.checkpointed(self.step, self.tokens_seen)

    def add(self, key: str, value: float) -> None:
        """One value of a metric for the window that the next row averages."""
        self.window.setdefault(key, []).append(value)


def step_weights(micro_batches: list[Batch], config: TrainConfig) -> list[float]:
    """The loss weight of each micro-batch of an optimizer step, padded with zeros to the most micro-batches any rank
    has this step. Fixed micro-batches: DeepSpeed averages them itself (weights unused). Token budget: each
    micro-batch's share of the step's loss tokens, so the step's gradient is that of the token mean over its rows
    whatever the split; ranks whose split has fewer micro-batches run zero-weight repeats so every rank calls
    backward (and its gradient reduction) equally often."""
    if not config.max_tokens_per_micro_batch:
        return [1.0] * len(micro_batches)
    tokens = [batch.num_tokens for batch in micro_batches]
    total = max(sum(tokens), 1)
    return [n / total for n in tokens] + [0.0] * (distributed.max_over_ranks(len(tokens)) - len(tokens))


def topk_width(batch: Batch) -> int:
    """K of the batch's teacher top-k (0 without one): the drift statistics compare it with the student's own top-k."""
    return batch.fields["topk_ids"].shape[-1] if "topk_ids" in batch.fields else 0


def untempered(inputs: LossInputs, head: StudentHead, batch: Batch) -> LossInputs:
    """`inputs` with the student's log-probs at temperature 1 (drift is measured against the untempered policy):
    a second, gradient-free chunked pass only when the loss reads a tempered student."""
    if inputs.student.request.temperature == 1.0:
        return inputs
    with torch.no_grad():
        return replace(inputs, student=head(batch, StudentRequest(topk_overlap=topk_width(batch))))


def filter_tokens(token_filter, head: StudentHead, batch: Batch, inputs: LossInputs) -> tuple[LossInputs, dict[str, float]]:
    """Apply the aligned-token filter, which needs full logits (materialised here without grad), to `inputs`' mask."""
    full = StudentLogprobs.from_logits(head.full_logits(batch), batch.tokens, batch.mask, batch.fields.get("topk_ids"),
                                       inputs.student.request)
    filtered, metrics = token_filter(replace(inputs, student=full), batch.rows)
    return replace(inputs, mask=filtered.mask), metrics


def save_checkpoint(engine, tokenizer, out_dir: Path, config: TrainConfig, student: str, source) -> None:
    """A Hugging Face checkpoint (`save_pretrained`) plus lineage: what it was trained from, and on what."""
    if config.zero_stage == 3:  # keys of the StudentHead wrapper ("lm.<name>") back to the model's own
        state = {key.removeprefix("lm."): value for key, value in engine._zero3_consolidated_16bit_state_dict().items()}
    else:
        state = None
    if distributed.rank() != 0:
        return
    model = engine.module.lm
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    parent = read_lineage(student)
    lineage = {
        "base_model": student,
        "base_fingerprint": model_fingerprint(student),
        "loss": config.loss,
        "loss_args": dict(config.loss_args),
        "config": {k: v for k, v in asdict(config).items() if k not in ("loss", "loss_args")},
        "sft_data_model": parent.get("sft_data_model"),
    }
    if isinstance(source, ScoreCache):
        lineage["trained_on"] = {"score_set": source.id, "rollout_set": source.rollouts.id}
        lineage["teacher_consistency"] = teacher_consistency(student, source, config.allow_teacher_mismatch)
    elif isinstance(source, RolloutSet):
        lineage["trained_on"] = {"rollout_set": source.id}
        if config.loss == "sft":
            lineage["sft_data_model"] = source.meta["model_fingerprint"]
    write_lineage(out_dir, lineage)
    if config.lora_rank and config.merge_lora:  # the full model vLLM loads for the next rollout; training is over
        merged_dir = out_dir / MERGED_DIR
        model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        write_lineage(merged_dir, lineage)
