"""`lopd rollout`: a model generates n samples per prompt with vLLM; tokens, behaviour log-probs and rewards go to Parquet.

Behaviour log-probs are the engine's raw log-probs of each sampled token (before temperature), i.e. log pi(y_t)
of the model itself, so importance weights pi_theta / pi_behaviour start at exactly 1 for the same weights.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from tqdm import tqdm

from lopd.cost.ledger import record_stage
from lopd.engine import build_llm, engine_context, numeric_engine_args, running_context, running_engine, shutdown_llm
from lopd.environment import Environment, describe, load_environment
from lopd.errors import LopdError
from lopd.fingerprint import digest_json, model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.location import Location, as_location, is_file, join
from lopd.models.lineage import read_lineage
from lopd.models.loading import load_tokenizer, model_config, resolve_model
from lopd.prompts import PLAIN, PromptFormat, load_prompts
from lopd.replicas import RayPlacement, replica_bundle, replica_devices, run_on_replicas
from lopd.rollout_set import META, RolloutSet, rollouts_dir, write_rollout_set
from lopd.verifier import absolute_spec, load_judge, load_verifier


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled, for `lopd rollout`, `lopd eval`, refresh and online OPD alike.

    `max_tokens` None means "as many as the engine's context leaves after the prompt" (what vLLM's own server
    does): a reasoning model's answer is then cut only by the context the user chose, never by a small default.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int = 0

    def within(self, context: int | None) -> SamplingConfig:
        """This config with an unset `max_tokens` made explicit for an engine of `context` tokens (the longest
        response any prompt leaves room for), so a set's metadata and identity record the number used."""
        if self.max_tokens is not None or context is None:
            return self
        return replace(self, max_tokens=context - 1 - SCORING_ROOM)


def encode_prompts(tokenizer, rows: list[dict[str, Any]], prompt_format: PromptFormat = PLAIN) -> list[list[int]]:
    """The exact ids the engine sees: the tokenizer's own encoding, or its chat template applied to each prompt.

    These ids are stored with the rollouts, and teachers and students read them back: nothing re-tokenises.
    """
    if all("prompt_ids" in r for r in rows):  # ids recorded earlier (e.g. a refresh re-rolling stored prompts)
        return [[int(i) for i in r["prompt_ids"]] for r in rows]
    if not prompt_format.chat:
        return [tokenizer(r["prompt"])["input_ids"] for r in rows]
    if not getattr(tokenizer, "chat_template", None):
        raise LopdError(f"the tokenizer of {tokenizer.name_or_path} has no chat template, so --chat cannot format "
                        f"prompts; drop --chat or use a model whose tokenizer_config.json has a chat_template")
    return [_apply_chat_template(tokenizer, prompt_format, r) for r in rows]


def _apply_chat_template(tokenizer, prompt_format: PromptFormat, row: dict[str, Any]) -> list[int]:
    from jinja2 import TemplateError

    try:
        return list(tokenizer.apply_chat_template(prompt_format.messages(row["prompt"]), add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    except TemplateError as exc:
        raise LopdError(f"the chat template of {tokenizer.name_or_path} fails on prompt {row['id']}: {exc}; "
                        f"fix the template or drop --chat/--system-prompt") from None


def rollout(
    model: str,
    prompts: str | Path | list[dict[str, Any]],
    sampling: SamplingConfig,
    *,
    root: Location,
    verifier: str | None = None,
    out: str | os.PathLike | None = None,
    llm=None,
    quiet: bool = False,
    experiment: str = "default",
    prompt_format: PromptFormat = PLAIN,
    tool: str | None = None,
    judge: str | None = None,
    engine_args: Mapping[str, Any] | None = None,
    skip_invalid: bool = False,
    placement: RayPlacement | None = None,
) -> tuple[RolloutSet, bool]:
    """Generate (or find already generated) rollouts. Returns the set and whether it was reused.

    `tool` (module:attr) names a tool environment (lopd.environment): generation then runs multi-turn, the
    environment's observations are spliced into each response and `step_spans` records the model's own
    spans. `judge` (module:function) fills `rubric_reward` with a rubric score in [0, 1]. `engine_args` are
    vLLM engine options (checked by `lopd.engine.check_engine_args`; with `llm`, the ones it was built with).
    Prompts are checked against the engine's context before it starts: an empty or over-long prompt is an
    error naming it, or, with `skip_invalid`, left out and counted in the set's metadata. `placement` samples on
    Ray replicas (lopd.replicas) instead of one engine in this process; seeds follow the prompt's position, so the
    replicas draw the random numbers one engine would (the samples match where vLLM's arithmetic does not depend on
    batch composition, which it does not guarantee).
    """
    prompt_format.validate()
    model = resolve_model(model)
    verifier, judge, tool = absolute_spec(verifier), absolute_spec(judge), absolute_spec(tool)
    engine_args = dict(engine_args or {})
    rows = load_prompts(prompts) if not isinstance(prompts, list) else prompts
    env = load_environment(tool)
    tokenizer = load_tokenizer(model)
    prompt_ids = encode_prompts(tokenizer, rows, prompt_format)
    context = running_context(llm) if llm is not None else engine_context(model, model_config(model), engine_args)
    check_max_tokens(sampling.max_tokens, context, model)
    sampling = sampling.within(context)
    rows, prompt_ids, skipped = check_prompts(rows, prompt_ids, context, skip_invalid)
    identity = rollout_identity(model, tokenizer, sampling, rows, prompt_ids, verifier, prompt_format,
                                tool=tool, env=env, judge=judge, engine_args=engine_args)
    set_id = "r-" + digest_json(identity)
    path = as_location(out) if out else join(rollouts_dir(root), set_id)
    if is_file(join(path, META)):
        existing = RolloutSet.open(path)
        if existing.id == set_id:
            with record_stage(root, experiment=experiment, stage="rollout", artifact=set_id, inputs=[model]) as rec:
                rec.cache_hit = True
            return existing, True
    verify = load_verifier(verifier)
    rubric = load_judge(judge)
    with record_stage(root, experiment=experiment, stage="rollout", artifact=set_id, inputs=[model]) as rec:
        trajectories, context = sample_anywhere(placement, llm, model, engine_args, rows, prompt_ids, sampling,
                                                tool, context, quiet=quiet)
        if placement is not None:
            rec.device_kind, rec.device_count = replica_devices(engine_args, placement.replicas)
        rollouts = rollout_records(rows, prompt_ids, trajectories, sampling.n, verify)
        truncated = length_report(rollouts, context, sampling.max_tokens)
        if rubric is not None:
            for record in rollouts:
                record["rubric_reward"] = float(rubric(rows[record["group_id"]], record["text"]))
        for record in rollouts:
            del record["text"]
        rec.tokens = sum(len(r["response_ids"]) for r in rollouts)
    meta = dict(identity, id=set_id, model=model, lineage=read_lineage(model), engine=engine_version(),
                prompt_format=asdict(prompt_format), vocab_fingerprint=vocabulary_fingerprint(tokenizer),
                truncated=truncated, skipped_prompts=skipped)
    return write_rollout_set(path, rollouts, meta), False


# Positions a rollout leaves free at the end of the context: scoring a row asks vLLM for one output token after
# it, so a row that filled the context could not be scored by a teacher with the same context.
SCORING_ROOM = 1


def check_max_tokens(max_tokens: int | None, context: int | None, model: str) -> None:
    if context is not None and max_tokens is not None and max_tokens >= context:
        raise LopdError(f"--max-tokens {max_tokens} does not fit the context of {model} ({context} tokens, prompt "
                        f"included); lower --max-tokens or raise --engine-arg max_model_len")


def check_prompts(rows: list[dict[str, Any]], prompt_ids: list[list[int]], context: int | None,
                  skip_invalid: bool) -> tuple[list[dict[str, Any]], list[list[int]], dict[str, Any]]:
    """Drop (with `skip_invalid`) or refuse prompts vLLM would fail on mid-run, killing the whole rollout.

    A prompt is empty (no text or no tokens) or too long: it must leave room for one generated token and
    SCORING_ROOM. Returns the rows kept, their ids and what was skipped (counts and the first ids) for the
    set's metadata.
    """
    longest = None if context is None else context - 1 - SCORING_ROOM
    kept_rows, kept_ids, skipped = [], [], {"empty": 0, "too_long": 0, "ids": []}
    for row, ids in zip(rows, prompt_ids):
        where = f"prompt {row['id']}" + (f" ({row['_where']})" if row.get("_where") else "")
        if not ids or not str(row.get("prompt", "x")).strip():
            problem, message = "empty", f"{where} is empty"
        elif longest is not None and len(ids) > longest:
            problem = "too_long"
            message = (f"{where} has {len(ids)} tokens; the engine's context of {context} leaves room for prompts "
                       f"of at most {longest} (one generated token and one for scoring)")
        else:
            kept_rows.append(row)
            kept_ids.append(ids)
            continue
        if not skip_invalid:
            raise LopdError(f"{message}; fix or remove it, or pass --skip-invalid to leave such prompts out")
        skipped[problem] += 1
        if len(skipped["ids"]) < 20:
            skipped["ids"].append(row["id"])
    if not kept_rows:
        raise LopdError(f"every prompt is empty or too long for the engine's context ({context} tokens); "
                        f"nothing to roll out")
    return kept_rows, kept_ids, skipped


def length_report(records: list[dict[str, Any]], context: int, max_tokens: int) -> dict[str, int]:
    """Counts rollouts cut off by the length limit and warns once: a cut-off response is not a finished answer.

    `at_context`: cut by the engine's context (prompt + response filled it), the rest by --max-tokens.
    """
    cut = [r for r in records if r["finish_reason"] == "length"]
    at_context = sum(len(r["prompt_ids"]) + len(r["response_ids"]) >= context - SCORING_ROOM for r in cut)
    if cut:
        print(f"warning: {len(cut)} of {len(records)} rollouts stopped at the length limit ({at_context} at the "
              f"engine context of {context} tokens, {len(cut) - at_context} at --max-tokens {max_tokens}); their "
              f"responses are cut off: raise --max-tokens or --engine-arg max_model_len", file=sys.stderr)
    return {"length": len(cut), "at_context": at_context, "max_model_len": context}


def rollout_identity(model: str, tokenizer, sampling: SamplingConfig, rows: list[dict[str, Any]],
                     prompt_ids: list[list[int]], verifier: str | None, prompt_format: PromptFormat, *,
                     tool: str | None = None, env: Environment | None = None, judge: str | None = None,
                     engine_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that determines a rollout set; its hash is the set id.

    The prompt format enters only when it is a chat format, the tool environment and judge only when used,
    and engine options only those that change the numbers (lopd.engine.NUMERIC_ENGINE_ARGS) and only when set,
    so plain-text single-turn rollout sets keep the ids they had before (their caches stay reachable).
    """
    identity = {
        "kind": "rollouts",
        "model_fingerprint": model_fingerprint(model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "sampling": asdict(sampling),
        "prompts": digest_json([[r["id"], ids, r.get("answer")] for r, ids in zip(rows, prompt_ids)]),
        "verifier": verifier or "",
    }
    if prompt_format.chat:
        identity["prompt_format"] = asdict(prompt_format)
    if tool:
        identity["tool"] = dict(describe(env) if env is not None else {}, spec=tool)
    if judge:
        identity["judge"] = judge
    if numeric_engine_args(engine_args or {}):
        identity["engine_args"] = numeric_engine_args(engine_args or {})
    return identity


def sample(engine, rows, prompt_ids, tokenizer, sampling: SamplingConfig, *, env: Environment | None = None,
           logprobs: bool = True, quiet: bool = True, first_prompt: int = 0) -> list[Trajectory]:
    """One Trajectory per request, request g*n+s = sample s of prompt g, none longer than the context allows; with
    `env`, multi-turn with the tool (generate_with_tool). The prompts are those at `first_prompt` onwards of the
    whole set: seeds follow that position, so a slice sampled on a Ray replica draws the random numbers one engine
    sampling the whole set would. Used by `lopd rollout` and `lopd eval`."""
    if env is not None:
        return generate_with_tool(engine, rows, prompt_ids, tokenizer, env, sampling, logprobs=logprobs, quiet=quiet,
                                  first_prompt=first_prompt)
    from vllm import SamplingParams

    sampling = sampling.within(running_context(engine))
    params = SamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
        logprobs=0 if logprobs else None, flat_logprobs=logprobs,
    )
    per_request = seeded(params, sampling.seed, len(prompt_ids), first=first_prompt)
    room = running_context(engine) - SCORING_ROOM
    for p, ids in zip(per_request, prompt_ids):
        p.max_tokens = min(p.max_tokens, room - len(ids))
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], per_request, use_tqdm=not quiet)

    samples: list[Trajectory] = []
    for row, ids, request in zip(rows, prompt_ids, outputs):
        if list(request.prompt_token_ids) != ids:
            raise LopdError(f"vLLM generated prompt {row['id']} from other token ids than the ones given; "
                            f"the rollout set would not match its own prompts, so nothing was written")
        for completion in request.outputs:
            response = list(completion.token_ids)
            samples.append(Trajectory(response, sampled_logprobs(completion.logprobs, response) if logprobs
                                      else [0.0] * len(response), [[0, len(response)]],
                                      str(completion.finish_reason),
                                      text=tokenizer.decode(response, skip_special_tokens=True)))
    return samples


def checked_engine_context(engine, rows, prompt_ids, sampling: SamplingConfig, model: str, expected: int | None) -> int:
    """The running engine's context, re-checking the prompts against it when it is not the one lopd predicted
    (vLLM also reads limits lopd does not, e.g. the tokenizer's)."""
    context = running_context(engine)
    if context != expected:
        check_max_tokens(sampling.max_tokens, context, model)
        check_prompts(rows, prompt_ids, context, skip_invalid=False)
    return context


def sample_anywhere(placement: RayPlacement | None, llm, model: str, engine_args: Mapping[str, Any], rows, prompt_ids,
                    sampling: SamplingConfig, tool: str | None, expected: int | None, *, logprobs: bool = True,
                    quiet: bool = True) -> tuple[list[Trajectory], int]:
    """Every prompt's trajectories and the engine context they were sampled under: on `llm` or a new engine in
    this process, or on Ray replicas when `placement` is given. `expected` is the context the caller checked the
    prompts against; an engine that runs with another has them checked again."""
    if placement is None:
        with running_engine(llm, model, seed=sampling.seed, engine_args=engine_args) as engine:
            context = checked_engine_context(engine, rows, prompt_ids, sampling, model, expected)
            return sample(engine, rows, prompt_ids, load_tokenizer(model), sampling, env=load_environment(tool),
                          logprobs=logprobs, quiet=quiet), context
    spans = prompt_spans(len(prompt_ids), placement.replicas)
    done: dict[int, tuple[list[Trajectory], int]] = {}
    with tqdm(total=len(prompt_ids) * sampling.n, unit="sample", disable=quiet,
              desc=f"sample {model} on {placement.replicas} replicas") as bar:
        def collect(result: tuple[int, list[Trajectory], int]) -> None:
            done[result[0]] = result[1:]
            bar.update(len(result[1]))

        run_on_replicas(placement, SamplingReplica, (model, dict(engine_args), rows, prompt_ids, sampling, tool,
                                                     logprobs, expected),
                        replica_bundle(engine_args), spans, collect, name="lopd-sample")
    return [t for start in sorted(done) for t in done[start][0]], min(c for _, c in done.values())


def prompt_spans(count: int, replicas: int, per_replica: int = 4) -> list[tuple[int, int]]:
    """[start, stop) prompt ranges, about `per_replica` per replica, so a slow or restarted replica holds back
    little and the others take the rest."""
    size = max(1, -(-count // (replicas * per_replica)))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


class SamplingReplica:
    """A Ray replica of `lopd rollout --ray` / `lopd eval --ray`: one vLLM engine sampling the prompt ranges the
    driver hands it."""

    def __init__(self, model: str, engine_args: dict[str, Any], rows, prompt_ids, sampling: SamplingConfig,
                 tool: str | None, logprobs: bool, expected_context: int | None):
        self.engine = build_llm(model, seed=sampling.seed, engine_args=engine_args)
        self.context = checked_engine_context(self.engine, rows, prompt_ids, sampling, model, expected_context)
        self.tokenizer, self.env = load_tokenizer(model), load_environment(tool)
        self.rows, self.prompt_ids, self.sampling, self.logprobs = rows, prompt_ids, sampling, logprobs

    def run(self, span: tuple[int, int]) -> tuple[int, list[Trajectory], int]:
        start, stop = span
        return start, sample(self.engine, self.rows[start:stop], self.prompt_ids[start:stop], self.tokenizer,
                             self.sampling, env=self.env, logprobs=self.logprobs, first_prompt=start), self.context

    def close(self) -> None:
        shutdown_llm(self.engine)


def rollout_records(rows, prompt_ids, samples: list["Trajectory"], n: int, verify) -> list[dict[str, Any]]:
    """One rollout-set record per sample; sample g*n+s is sample s of prompt g (its group), rewarded by `verify`."""
    records = []
    for group_id, (row, ids) in enumerate(zip(rows, prompt_ids)):
        for sample_index in range(n):
            t = samples[group_id * n + sample_index]
            records.append(
                {
                    "prompt_id": row["id"],
                    "group_id": group_id,
                    "sample_index": sample_index,
                    "prompt": row["prompt"],
                    "answer": None if row.get("answer") is None else str(row["answer"]),
                    "prompt_ids": ids,
                    "response_ids": t.response_ids,
                    "behaviour_logprobs": t.logprobs,
                    "finish_reason": t.finish_reason,
                    "reward": None if verify is None else float(verify(row, t.text)),
                    "step_spans": t.spans,
                    "rubric_reward": None,
                    "text": t.text,
                }
            )
    return records


@dataclass
class Trajectory:
    """One sampled response: the model's tokens and, with a tool, the environment's observations interleaved."""

    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # behaviour log-probs; 0.0 on observation tokens
    spans: list[list[int]] = field(default_factory=list)  # [start, end) of each model-generated step
    finish_reason: str = ""
    calls: int = 0
    text: str = ""


def generate_with_tool(engine, rows: list[dict[str, Any]], prompt_ids: list[list[int]], tokenizer, env: Environment,
                       sampling: SamplingConfig, *, logprobs: bool = True, quiet: bool = True,
                       first_prompt: int = 0) -> list[Trajectory]:
    """Generate with a tool in the loop; returns one Trajectory per request, request g*n+s = sample s of prompt g
    (seeded as request (first_prompt + g)*n+s of the whole set, see `sample`).

    Each round is one batched `LLM.generate` over every active request (its prompt plus its response so far,
    as token ids), stopping at the environment's call-ending strings (kept in the output), EOS or the token
    budget. After a call, `env.observe(row, response_text)` gives the observation, which is tokenised without
    special tokens and appended (log-prob 0.0); None ends the response. Each request draws from its own seed
    per round, so results do not depend on batch composition. Used by `lopd rollout` and `lopd eval`.
    """
    from vllm import SamplingParams

    sampling = sampling.within(running_context(engine))
    n = sampling.n
    base = SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=1,
                          stop=list(env.stop), include_stop_str_in_output=True,
                          logprobs=0 if logprobs else None, flat_logprobs=logprobs)
    max_len = running_context(engine) - SCORING_ROOM
    limits = _scheduler_limits(engine)
    requests = [(g, ids) for g, ids in enumerate(prompt_ids) for _ in range(n)]
    out = [Trajectory() for _ in requests]
    active = list(range(len(requests)))
    for turn in range(int(env.max_calls) + 1):
        batch, params = [], []
        for r in active:
            context = requests[r][1] + out[r].response_ids
            budget = sampling.max_tokens - len(out[r].response_ids)
            budget = min(budget, max_len - len(context))
            if budget <= 0:
                out[r].finish_reason = "length"
                continue
            p = base.clone()
            p.max_tokens = budget
            p.seed = turn_seed(sampling.seed, first_prompt * n + r, turn)
            batch.append(r)
            params.append(p)
        if not batch:
            break
        contexts = [requests[r][1] + out[r].response_ids for r in batch]
        outputs = []
        for lo, hi in _step_sized_chunks([len(c) for c in contexts], *limits):
            outputs += engine.generate([{"prompt_token_ids": c} for c in contexts[lo:hi]], params[lo:hi],
                                       use_tqdm=not quiet)
        active = []
        for r, request in zip(batch, outputs):
            t, completion = out[r], request.outputs[0]
            tokens = list(completion.token_ids)
            start = len(t.response_ids)
            t.response_ids += tokens
            t.logprobs += sampled_logprobs(completion.logprobs, tokens) if logprobs else [0.0] * len(tokens)
            if tokens:
                t.spans.append([start, start + len(tokens)])
            t.finish_reason = str(completion.finish_reason)
            called = completion.finish_reason == "stop" and completion.stop_reason in env.stop
            if not called:
                continue
            if t.calls >= env.max_calls:
                t.finish_reason = "max_calls"
                continue
            observation = env.observe(rows[requests[r][0]], tokenizer.decode(t.response_ids, skip_special_tokens=True))
            if observation is None:
                continue
            t.calls += 1
            obs_ids = list(tokenizer(observation, add_special_tokens=False)["input_ids"])
            room = sampling.max_tokens - len(t.response_ids)
            room = min(room, max_len - len(requests[r][1]) - len(t.response_ids))
            t.response_ids += obs_ids[: max(room, 0)]
            t.logprobs += [0.0] * min(len(obs_ids), max(room, 0))
            if len(obs_ids) >= room:
                t.finish_reason = "length"
                continue
            active.append(r)
    for t in out:
        t.text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
    return out


def turn_seed(seed: int, request: int, turn: int) -> int:
    """Round 0 uses `seeded`'s seed for the request; later rounds a hash of (seed, request, round)."""
    if turn == 0:
        return seed * 1_000_003 + request
    digest = hashlib.blake2b(f"{seed}/{request}/{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def _scheduler_limits(engine) -> tuple[int, int]:
    """(tokens, sequences) one engine step can schedule; unbounded when the engine does not say."""
    try:
        config = engine.llm_engine.vllm_config.scheduler_config
        return int(config.max_num_batched_tokens), int(config.max_num_seqs)
    except AttributeError:
        return 1 << 62, 1 << 62


def _step_sized_chunks(lengths: list[int], max_tokens: int, max_seqs: int) -> list[tuple[int, int]]:
    """Split requests into consecutive [lo, hi) chunks whose prompts all prefill in one engine step.

    Multi-turn continuations are long prompts; when one is prefilled in pieces (chunked prefill), vLLM's CPU
    worker rewinds the request's seeded generator, which CPU generators do not support, and the engine dies
    ("CPU Generator does not use offset"). A chunk whose prompt tokens fit one step's token budget and sequence
    limit is admitted whole in the first step, so no prefill is split.
    """
    chunks, lo, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > lo and (tokens + n > max_tokens or i - lo >= max_seqs):
            chunks.append((lo, i))
            lo, tokens = i, 0
        tokens += n
    if lo < len(lengths):
        chunks.append((lo, len(lengths)))
    return chunks


def sampled_logprobs(logprobs, response: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's flat logprobs (entry 0 of each position is the sampled token)."""
    starts = logprobs.start_indices
    values = logprobs.logprobs
    ids = logprobs.token_ids
    out = []
    for pos, token in enumerate(response):
        i = starts[pos]
        assert ids[i] == token, "vLLM flat logprobs: first entry of a position is not the sampled token"
        out.append(values[i])
    return out


def seeded(params, seed: int, count: int, first: int = 0) -> list:
    """One copy of `params` per request, each with its own seed derived from (seed, request index), the requests
    being those at `first` onwards.

    Samples then depend on the seed and the prompt's position only, not on what the engine ran before: rollouts
    are reproducible, and checkpoints evaluated on one engine in turn see the same random numbers (a paired
    comparison, which cancels sampling noise between arms).
    """
    copies = []
    for i in range(count):
        p = params.clone()
        p.seed = seed * 1_000_003 + first + i
        copies.append(p)
    return copies


def engine_version() -> str:
    import vllm

    return f"vllm-{vllm.__version__}"
