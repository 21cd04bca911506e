"""`lopd score`: a teacher scores every stored rollout token once with vLLM; the signal goes to a score set.

For each response position the teacher's log-prob of the sampled token (even outside the top-k), its top-k
ids and log-probs, and the log of the remaining tail mass are stored. Scoring asks vLLM for prompt
log-probs over the exact stored token ids (`max_tokens=1`), with flat log-probs and no detokenisation
(12x faster at k=32 than vLLM's defaults), in batches bounded by a token budget so prompt-logprob memory
stays bounded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from lopd import location
from lopd.cache.bucket_set import score_set_writer
from lopd.cache.layout import LOGPROB_DTYPES, id_dtype
from lopd.cache.score_set import MANIFEST, ScoreSetWriter, ShardPlan, damaged_shards, read_manifest, scores_dir
from lopd.contexts import expand_context, teacher_prompts
from lopd.cost.ledger import record_stage
from lopd.engine import (SCORING_BATCHED_TOKENS, build_llm, check_k, engine_context, numeric_engine_args,
                         running_context, running_engine, shutdown_llm)
from lopd.errors import LopdError
from lopd.fingerprint import digest_json, model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.location import Location
from lopd.models.guards import rollout_vocabulary
from lopd.models.loading import load_tokenizer, model_config, resolve_model, vocab_size
from lopd.replicas import RayPlacement, replica_bundle, replica_devices, run_on_replicas
from lopd.rollout import engine_version
from lopd.rollout_set import RolloutSet
from lopd.storage import read_json

LOGPROB_FLOOR = -1e4  # keeps float16 finite; any log-prob below it is "impossible" for every loss
# Extra log-probs asked of a teacher with a padded vocabulary (lopd.score.padded_ids) so its k best defined ids
# are among those returned; a row where more padded ids than this outrank them is asked again exactly.
PADDED_MARGIN = 8


@dataclass(frozen=True)
class ScoreConfig:
    k: int = 32
    logprob_dtype: str = "float16"
    max_batch_tokens: int = 16384
    rows_per_shard: int = 1024
    # Privileged context (lopd.contexts): a template over the rollout row's fields (e.g. "{answer}|", or a preset
    # name such as "answer") whose tokens are spliced in front of the prompt for the teacher only, and/or a slice
    # that keeps only the prompt's last `context_slice` tokens. The response positions, and so the cache's row
    # layout, stay those of the plain rollouts.
    context: str | None = None
    context_slice: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", expand_context(self.context))

    def validate(self) -> None:
        if self.k < 1:
            raise LopdError(f"--k must be at least 1 (top-k ids are part of every score set), got {self.k}")
        if self.context_slice < 0:
            raise LopdError(f"--context-slice must be at least 0 (0 keeps the whole prompt), got {self.context_slice}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise LopdError(f"--logprob-dtype must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype!r}")


@dataclass
class ScoreResult:
    path: Location
    id: str
    reused: bool
    teacher_seconds: float
    positions: int
    repaired: dict[str, str] = field(default_factory=dict)  # shard -> why it was rescored (missing, corrupt)
    # Whether the set is whole now; a `--shard i/N` worker can finish its shards while others are still missing.
    complete: bool = True
    shards_written: int = 0
    shards_total: int = 0
    shard_of: tuple[int, int] = (0, 1)


def check_same_vocabulary(teacher_tokenizer, rollouts: RolloutSet) -> None:
    if tokenizer_fingerprint(teacher_tokenizer) == rollouts.meta["tokenizer_fingerprint"]:
        return
    if vocabulary_fingerprint(teacher_tokenizer) != rollout_vocabulary(rollouts):
        raise LopdError(
            "teacher and student tokenizers have different vocabularies; cross-tokenizer distillation is not "
            "supported yet: use a teacher that shares the student's tokenizer"
        )


def padded_ids(teacher_config: dict, tokenizer) -> int:
    """How many ids the teacher's embedding has beyond those its tokenizer defines (Qwen3 pads 151,669 tokens to
    151,936). They are never generated, and the student may not even have them, so they are kept out of the
    cached top-k; their probability mass stays in the tail."""
    return max(vocab_size(teacher_config) - len(tokenizer), 0)


def score_set_identity(teacher: str, tokenizer, rollouts: RolloutSet, config: ScoreConfig,
                       engine_args: Mapping[str, Any] | None = None) -> dict:
    """Everything that determines a score set's numbers; its hash is the score set id.

    Engine options enter only those that change the numbers (dtype, quantization, length, KV-cache dtype) and
    only when set, so score sets made without engine options keep their ids.
    """
    identity = {
        "kind": "score_set",
        "rollout_set": {"id": rollouts.id, "content_digest": rollouts.meta["content_digest"]},
        "teacher": {"fingerprint": model_fingerprint(teacher)},
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "config": {"k": config.k, "temperature": 1.0, "logprob_dtype": config.logprob_dtype,
                   "engine": engine_version(), "context": config.context},
    }
    if config.context_slice:  # only when set, so score sets made before slices existed keep their ids
        identity["config"]["context_slice"] = config.context_slice
    if numeric_engine_args(engine_args or {}):
        identity["config"]["engine_args"] = numeric_engine_args(engine_args or {})
    if padded_ids(model_config(teacher), tokenizer):  # likewise; and sets that cached padded ids are not reused
        identity["config"]["topk_ids_below"] = len(tokenizer)
    return identity


def score(
    teacher: str,
    rollouts: RolloutSet,
    config: ScoreConfig,
    *,
    root: Location,
    out: str | Path | None = None,
    shard_of: tuple[int, int] = (0, 1),
    llm=None,
    quiet: bool = False,
    experiment: str = "default",
    engine_args: Mapping[str, Any] | None = None,
    expect_id: str | None = None,
    placement: RayPlacement | None = None,
) -> ScoreResult:
    """Score `rollouts` with `teacher` into the score set their identity names, or finish or repair it.

    A set that already exists is checked first: its committed shards that are missing or fail their checksum
    are rescored along with any never written (an intact complete set is a cache hit). `expect_id` (repair)
    refuses to proceed when today's teacher, tokenizer or engine would make a different set. `engine_args` are
    vLLM engine options (checked by `lopd.engine.check_engine_args`; with `llm`, the ones it was built with).
    `placement` scores on Ray replicas instead of one engine in this process (lopd.replicas); the set is the same.
    `root` (and `out`) may be a bucket URL: the set is then written by create-if-absent commits
    (lopd.cache.bucket_set) instead of flock, and the rollout set must lie in the same bucket.

    The engine's context is sized from the longest stored row (prompt + response + the one output token vLLM
    requires), unless `max_model_len` is given; a row that cannot fit is an error before anything is written.
    """
    config.validate()
    engine_args = dict(engine_args or {})
    teacher = resolve_model(teacher)
    teacher_config = model_config(teacher)
    tokenizer = load_tokenizer(teacher)
    padded = padded_ids(teacher_config, tokenizer)
    vocab = vocab_size(teacher_config)
    check_k(config.k, vocab - padded, max_logprobs=llm.llm_engine.model_config.max_logprobs if llm else None,
            padded=min(padded, PADDED_MARGIN))
    check_same_vocabulary(tokenizer, rollouts)

    header = score_set_identity(teacher, tokenizer, rollouts, config, engine_args)
    set_id = "s-" + digest_json(header)
    if expect_id is not None and set_id != expect_id:
        raise LopdError(f"score set {expect_id} cannot be repaired here: this teacher, tokenizer and engine version "
                        f"would make score set {set_id} (the vLLM version or the teacher's files changed); "
                        "rescore with `lopd score` into a new set")
    path = location.as_location(out) if out else location.join(scores_dir(root), set_id)
    damaged: dict[str, str] = {}
    if location.is_file(location.join(path, MANIFEST)):
        existing = read_manifest(path)
        if existing.get("id") == set_id:
            damaged = damaged_shards(path, existing)
            if existing.get("complete") and not damaged:
                with record_stage(root, experiment=experiment, stage="score", artifact=set_id,
                                  inputs=[rollouts.id]) as rec:
                    rec.cache_hit = True
                return ScoreResult(path, set_id, True, 0.0, sum(s["positions"] for s in existing["shards"].values()))

    prompts = rollouts.prompt_ids
    if config.context or config.context_slice:
        rows = rollouts.table.select(["prompt_id", "prompt", "answer"]).to_pylist()
        prompts = teacher_prompts(tokenizer, rows, prompts, config.context, config.context_slice)
    needed = check_rows_fit(teacher, teacher_config, rollouts, prompts, engine_args, llm)
    rollout_path = location.relative(rollouts.path, path)
    if rollout_path is None:
        raise LopdError(f"the rollout set {rollouts.path} and the score set {path} must both be local or both in one "
                        "bucket (the score set records where its rollouts are relative to itself); copy the rollout "
                        "set beside the score set's root")
    header = dict(header, id=set_id, vocab_size=vocab, id_dtype=str(id_dtype(vocab)), num_rows=len(rollouts))
    header["teacher"]["model"] = teacher  # where it was loaded from: informative, not part of the id
    header["rollout_set"]["path"] = rollout_path
    writer = score_set_writer(path, header, rows_per_shard=config.rows_per_shard)
    writer.discard(list(damaged))
    plans = writer.plan(len(rollouts), shard_of)

    build_args = {"max_logprobs": config.k + padded, "engine_args": engine_args,
                  "defaults": {"max_model_len": needed, "max_num_batched_tokens": SCORING_BATCHED_TOKENS}}
    shards = ShardScoring(str(rollouts.path), prompts, config, vocab, padded)
    with record_stage(root, experiment=experiment, stage="score", artifact=set_id, inputs=[rollouts.id]) as rec:
        if placement is None:
            with running_engine(llm, teacher, **build_args) as engine:
                result = _score_shards(writer, plans, rollouts, shards, set_id, engine, quiet)
        else:
            result = _score_on_replicas(placement, teacher, build_args, writer, plans, rollouts, shards, set_id, quiet)
            rec.device_kind, rec.device_count = replica_devices(engine_args, placement.replicas)
        rec.tokens = result.positions
    manifest = writer.finish(len(rollouts))
    if not manifest.get("complete") and shard_of == (0, 1):
        raise LopdError(f"score set {set_id} is still incomplete after scoring; rerun the same command")
    result.repaired = damaged
    result.complete, result.shard_of = bool(manifest.get("complete")), shard_of
    result.shards_written, result.shards_total = len(manifest["shards"]), len(writer.plan(len(rollouts)))
    return result


def check_rows_fit(teacher: str, teacher_config: dict, rollouts: RolloutSet, prompts: list[np.ndarray],
                   engine_args: Mapping[str, Any], llm) -> int:
    """The context scoring needs: the longest row (teacher prompt + stored response) plus the one output token
    vLLM requires. Refuses, naming the row, when that exceeds the engine's context (a running `llm`'s, the
    user's `max_model_len`, else the teacher's own), so no shard of an unscoreable set is ever written."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, rollouts.response_ids)]
    row = int(np.argmax(lengths)) if lengths else 0
    needed = (lengths[row] if lengths else 0) + 1
    if llm is not None:
        context = running_context(llm)
        fix = f"start the scoring engine with --engine-arg max_model_len={needed} or more"
    elif "max_model_len" in engine_args:
        context = engine_context(teacher, teacher_config, engine_args)
        fix = f"raise --engine-arg max_model_len to {needed} or more"
    else:
        context = engine_context(teacher, teacher_config, engine_args)
        fix = f"this teacher cannot score it; use one whose context is {needed} tokens or more"
    if context is not None and needed > context:
        prompt_id = rollouts.table.column("prompt_id")[row].as_py()
        raise LopdError(f"rollout row {row} (prompt {prompt_id}) has {lengths[row]} tokens and scoring it needs "
                        f"{needed}, more than the engine's context of {context}; {fix}")
    return needed


@dataclass
class ShardScoring:
    """What scoring one shard needs besides the engine and the writer; small enough to ship to Ray replicas (the
    rollout set travels as its path)."""

    rollouts_path: str
    prompts: list[np.ndarray]
    config: ScoreConfig
    vocab: int
    padded: int

    def score(self, engine, writer: ScoreSetWriter, plan: ShardPlan, rollouts: RolloutSet, bar) -> tuple[float, int]:
        """Score and commit the shard (inside the caller's claim); its teacher seconds and positions."""
        start = time.perf_counter()
        arrays = score_rows(engine, rollouts, plan, self.config, id_dtype(self.vocab), bar, self.prompts,
                            padded=self.padded, defined=self.vocab - self.padded)
        seconds = time.perf_counter() - start
        writer.commit(plan, arrays, {"teacher_seconds": round(seconds, 3)})
        return seconds, int(arrays["sampled_logprob"].shape[0])

    def tokens(self, rollouts: RolloutSet, plan: ShardPlan) -> int:
        return sum(len(rollouts.prompt_ids[i]) + len(rollouts.response_ids[i]) for i in range(plan.start, plan.stop))


def _score_shards(writer, plans, rollouts: RolloutSet, shards: ShardScoring, set_id, engine, quiet) -> ScoreResult:
    check_k(shards.config.k, shards.vocab - shards.padded, max_logprobs=engine.llm_engine.model_config.max_logprobs,
            padded=min(shards.padded, PADDED_MARGIN))
    todo = writer.pending(plans)
    teacher_seconds = 0.0
    positions = 0
    with tqdm(total=sum(shards.tokens(rollouts, p) for p in todo), unit="tok", desc=f"score {set_id}",
              disable=quiet or not todo) as bar:
        # First pass: shards nobody else holds. Second pass waits for shards another writer held, and
        # takes over any that writer left unfinished (e.g. it was killed).
        for wait in (False, True):
            for plan in writer.pending(plans):
                with writer.claim(plan, wait=wait) as mine:
                    if mine:
                        seconds, count = shards.score(engine, writer, plan, rollouts, bar)
                        teacher_seconds += seconds
                        positions += count
    return ScoreResult(writer.path, set_id, False, teacher_seconds, positions)


class ShardScorer:
    """A Ray replica of `lopd score --ray`: one vLLM engine that scores the shards the driver hands it."""

    def __init__(self, teacher: str, build_args: dict[str, Any], writer_path: str, shards: ShardScoring):
        self.engine = build_llm(teacher, **build_args)
        self.writer = score_set_writer(writer_path, read_manifest(location.as_location(writer_path)),
                                       shards.config.rows_per_shard)
        self.rollouts = RolloutSet.open(shards.rollouts_path)
        self.shards = shards

    def run(self, plan: ShardPlan) -> tuple[float, int, int]:
        """Teacher seconds, positions and rollout tokens of the shard (zeros when it was already committed: a
        retry after the replica died past its commit)."""
        with self.writer.claim(plan, wait=True) as mine:
            if not mine:
                return 0.0, 0, self.shards.tokens(self.rollouts, plan)
            seconds, positions = self.shards.score(self.engine, self.writer, plan, self.rollouts, tqdm(disable=True))
        return seconds, positions, self.shards.tokens(self.rollouts, plan)

    def close(self) -> None:
        shutdown_llm(self.engine)


def _score_on_replicas(placement: RayPlacement, teacher: str, build_args: dict[str, Any], writer: ScoreSetWriter,
                       plans: list[ShardPlan], rollouts: RolloutSet, shards: ShardScoring, set_id: str,
                       quiet: bool) -> ScoreResult:
    """The pending shards scored by `placement.replicas` Ray replicas, each committing its own shards into the set
    (on the shared storage root, a bucket included) through the same claim-and-commit protocol as `--shard i/N`
    writers."""
    todo = writer.pending(plans)
    totals = [0.0, 0]
    with tqdm(total=sum(shards.tokens(rollouts, p) for p in todo), unit="tok", desc=f"score {set_id} on "
              f"{placement.replicas} replicas", disable=quiet or not todo) as bar:
        def done(result: tuple[float, int, int]) -> None:
            totals[0] += result[0]
            totals[1] += result[1]
            bar.update(result[2])

        run_on_replicas(placement, ShardScorer, (teacher, build_args, str(writer.path), shards),
                        replica_bundle(build_args["engine_args"]), todo, done, name=f"lopd-score-{set_id}")
    return ScoreResult(writer.path, set_id, False, totals[0], totals[1])


def token_budget_batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive row indices whose summed lengths stay within `budget` (a longer row goes alone)."""
    batch: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if batch and used + n > budget:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        yield batch


def score_rows(engine, rollouts: RolloutSet, plan: ShardPlan, config: ScoreConfig, ids_dtype, bar,
               prompt_ids: list[np.ndarray], padded: int = 0, defined: int = 0) -> dict[str, np.ndarray]:
    """Teacher signal for the shard's rows; `prompt_ids` are what the teacher sees before each stored response
    (the stored prompt, or it with a privileged context spliced in).

    A padded teacher (`padded` ids at and above `defined`, lopd.score.padded_ids) keeps the k best defined ids.
    vLLM is asked for PADDED_MARGIN extra log-probs, which is enough unless more than that many padded ids
    outrank a position's k-th defined id; such a row is asked again with one extra per padded id, exactly."""
    from vllm import SamplingParams

    def logprobs(indices: list[int], extra: int) -> list:
        params = SamplingParams(max_tokens=1, prompt_logprobs=config.k + extra, flat_logprobs=True, detokenize=False)
        return engine.generate([{"prompt_token_ids": sequences[j].tolist()} for j in indices], params, use_tqdm=False)

    def unpack(j: int, output, extra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, ids, lps = unpack_prompt_logprobs(output.prompt_logprobs, prompt_lens[j], len(sequences[j]),
                                             config.k + extra)
        if not np.array_equal(ids[:, 0], sequences[j][prompt_lens[j]:]):
            raise LopdError("vLLM returned prompt log-probs for different tokens than the stored ones")
        return s, ids[:, 1:], lps

    rows = list(range(plan.start, plan.stop))
    sequences = [np.concatenate([prompt_ids[i], rollouts.response_ids[i]]) for i in rows]
    prompt_lens = [len(prompt_ids[i]) for i in rows]
    margin = min(padded, PADDED_MARGIN)
    sampled, top_ids, top_lps = [], [], []
    for batch in token_budget_batches([len(s) for s in sequences], config.max_batch_tokens):
        for j, output in zip(batch, logprobs(batch, margin)):
            s, ids, lps = unpack(j, output, margin)
            if padded and (ids < defined).sum(-1).min(initial=config.k) < config.k:
                check_k(config.k, defined, engine.llm_engine.model_config.max_logprobs, padded=padded)
                s, ids, lps = unpack(j, logprobs([j], padded)[0], padded)
            if padded:
                ids, lps = best_defined(ids, lps, config.k, defined)
            sampled.append(s)
            top_ids.append(ids)
            top_lps.append(lps)
            bar.update(len(sequences[j]))
    lengths = [len(s) for s in sampled]
    topk_lp = np.concatenate(top_lps) if top_lps else np.zeros((0, config.k), np.float32)
    tail = np.log(np.clip(1.0 - np.exp(topk_lp.astype(np.float64)).sum(-1), 1e-12, 1.0))
    dtype = np.dtype(config.logprob_dtype)
    return {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "sampled_logprob": _store(np.concatenate(sampled) if sampled else np.zeros(0), dtype),
        "topk_ids": (np.concatenate(top_ids) if top_ids else np.zeros((0, config.k))).astype(ids_dtype),
        "topk_logprobs": _store(topk_lp, dtype),
        "tail_logprob": _store(tail, dtype),
    }


def best_defined(ids: np.ndarray, lps: np.ndarray, k: int, defined: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the first k columns (columns are in rank order) whose id is below `defined`."""
    columns = np.argsort(ids >= defined, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(ids, columns, -1), np.take_along_axis(lps, columns, -1)


def _store(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.maximum(values, LOGPROB_FLOOR).astype(dtype)


def unpack_prompt_logprobs(flat, prompt_len: int, seq_len: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Response rows of vLLM FlatLogprobs: each position holds k+1 entries, the actual token first, then the top-k.

    Returns sampled-token log-probs [T], ids [T, k+1] (column 0 = actual token) and top-k log-probs [T, k].
    """
    first = flat.start_indices[prompt_len]
    last = flat.end_indices[seq_len - 1]
    n = seq_len - prompt_len
    if last - first != n * (k + 1):
        raise LopdError(f"vLLM returned {last - first} log-prob entries for {n} positions at k={k}; expected {n * (k + 1)}")
    ids = np.asarray(flat.token_ids[first:last], dtype=np.int64).reshape(n, k + 1)
    lps = np.asarray(flat.logprobs[first:last], dtype=np.float32).reshape(n, k + 1)
    return lps[:, 0], ids, lps[:, 1:]


def repair(path: location.Location, root: location.Location, teacher: str | None = None, llm=None,
           experiment: str = "default"):
    """Rescore exactly the missing or corrupt shards of the score set at `path`, local or in a bucket (and finish an
    incomplete one): `lopd score` rerun with the teacher and settings its manifest records. Returns its ScoreResult."""
    manifest = read_json(location.join(path, MANIFEST))
    rollouts = RolloutSet.open(location.resolve(location.join(path, manifest["rollout_set"]["path"])))
    recorded = manifest["config"]
    config = ScoreConfig(k=recorded["k"], logprob_dtype=recorded["logprob_dtype"],
                         rows_per_shard=manifest["rows_per_shard"], context=recorded.get("context"),
                         context_slice=recorded.get("context_slice", 0))
    return score(teacher or manifest["teacher"]["model"], rollouts, config, root=root, out=path, llm=llm,
                 experiment=experiment, expect_id=manifest["id"])
