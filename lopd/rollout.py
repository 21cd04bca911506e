"""`lopd rollout`: a model generates n samples per prompt with vLLM; tokens, behaviour log-probs and rewards go to Parquet.

Behaviour log-probs are the engine's raw log-probs of each sampled token (before temperature), i.e. log pi(y_t)
of the model itself, so importance weights pi_theta / pi_behaviour start at exactly 1 for the same weights.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lopd.cost.ledger import record_stage
from lopd.engine import build_llm, resolve_model
from lopd.environment import Environment, describe, load_environment
from lopd.errors import LopdError
from lopd.fingerprint import digest_json, model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.lineage import read_lineage
from lopd.prompts import PLAIN, PromptFormat, load_prompts
from lopd.rollout_set import RolloutSet, rollouts_dir, write_rollout_set
from lopd.verifier import load_judge, load_verifier


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    seed: int = 0


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


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
    root: Path,
    verifier: str | None = None,
    out: Path | None = None,
    llm=None,
    quiet: bool = False,
    experiment: str = "default",
    prompt_format: PromptFormat = PLAIN,
    tool: str | None = None,
    judge: str | None = None,
) -> tuple[RolloutSet, bool]:
    """Generate (or find already generated) rollouts. Returns the set and whether it was reused.

    `tool` (module:attr) names a tool environment (lopd.environment): generation then runs multi-turn, the
    environment's observations are spliced into each response and `step_spans` records the model's own
    spans. `judge` (module:function) fills `rubric_reward` with a rubric score in [0, 1].
    """
    prompt_format.validate()
    model = resolve_model(model)
    rows = load_prompts(prompts) if not isinstance(prompts, list) else prompts
    env = load_environment(tool)
    tokenizer = load_tokenizer(model)
    prompt_ids = encode_prompts(tokenizer, rows, prompt_format)
    identity = rollout_identity(model, tokenizer, sampling, rows, prompt_ids, verifier, prompt_format,
                                tool=tool, env=env, judge=judge)
    set_id = "r-" + digest_json(identity)
    path = Path(out) if out else rollouts_dir(root) / set_id
    if (path / "meta.json").is_file():
        existing = RolloutSet.open(path)
        if existing.id == set_id:
            with record_stage(root, experiment=experiment, stage="rollout", artifact=set_id, inputs=[model]) as rec:
                rec.cache_hit = True
            return existing, True
    verify = load_verifier(verifier)
    rubric = load_judge(judge)
    with record_stage(root, experiment=experiment, stage="rollout", artifact=set_id, inputs=[model]) as rec:
        if env is None:
            rollouts = _generate(model, rows, prompt_ids, tokenizer, sampling, verify, llm, quiet)
        else:
            rollouts = _generate_with_tool(model, rows, prompt_ids, tokenizer, sampling, verify, env, llm, quiet)
        if rubric is not None:
            for record in rollouts:
                record["rubric_reward"] = float(rubric(rows[record["group_id"]], record["text"]))
        for record in rollouts:
            del record["text"]
        rec.tokens = sum(len(r["response_ids"]) for r in rollouts)
    meta = dict(identity, id=set_id, model=model, lineage=read_lineage(model), engine=engine_version(),
                prompt_format=asdict(prompt_format), vocab_fingerprint=vocabulary_fingerprint(tokenizer))
    return write_rollout_set(path, rollouts, meta), False


def rollout_identity(model: str, tokenizer, sampling: SamplingConfig, rows: list[dict[str, Any]],
                     prompt_ids: list[list[int]], verifier: str | None, prompt_format: PromptFormat, *,
                     tool: str | None = None, env: Environment | None = None, judge: str | None = None) -> dict[str, Any]:
    """Everything that determines a rollout set; its hash is the set id.

    The prompt format enters only when it is a chat format, and the tool environment and judge only when
    used, so plain-text single-turn rollout sets keep the ids they had before (their caches stay reachable).
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
    return identity


def _generate(model, rows, prompt_ids, tokenizer, sampling: SamplingConfig, verify, llm, quiet) -> list[dict[str, Any]]:
    """One vLLM call over every prompt; one record per sampled response."""
    from vllm import SamplingParams

    engine = llm or build_llm(model, seed=sampling.seed)
    params = SamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
        logprobs=0, flat_logprobs=True,
    )
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], seeded(params, sampling.seed, len(prompt_ids)),
                              use_tqdm=not quiet)

    samples: list[Trajectory] = []
    for row, ids, request in zip(rows, prompt_ids, outputs):
        if list(request.prompt_token_ids) != ids:
            raise LopdError(f"vLLM generated prompt {row['id']} from other token ids than the ones given; "
                            f"the rollout set would not match its own prompts, so nothing was written")
        for completion in request.outputs:
            response = list(completion.token_ids)
            samples.append(Trajectory(response, sampled_logprobs(completion.logprobs, response), [[0, len(response)]],
                                      str(completion.finish_reason),
                                      text=tokenizer.decode(response, skip_special_tokens=True)))
    return rollout_records(rows, prompt_ids, samples, sampling.n, verify)


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


def _generate_with_tool(model, rows, prompt_ids, tokenizer, sampling: SamplingConfig, verify, env: Environment, llm,
                        quiet) -> list[dict[str, Any]]:
    """Multi-turn rollouts: n separate requests per prompt (same group id), the tool's observations spliced in."""
    engine = llm or build_llm(model, seed=sampling.seed)
    trajectories = generate_with_tool(engine, rows, prompt_ids, tokenizer, env, sampling, quiet=quiet)
    return rollout_records(rows, prompt_ids, trajectories, sampling.n, verify)


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
                       sampling: SamplingConfig, *, logprobs: bool = True, quiet: bool = True) -> list[Trajectory]:
    """Generate with a tool in the loop; returns one Trajectory per request, request g*n+s = sample s of prompt g.

    Each round is one batched `LLM.generate` over every active request (its prompt plus its response so far,
    as token ids), stopping at the environment's call-ending strings (kept in the output), EOS or the token
    budget. After a call, `env.observe(row, response_text)` gives the observation, which is tokenised without
    special tokens and appended (log-prob 0.0); None ends the response. Each request draws from its own seed
    per round, so results do not depend on batch composition. Used by `lopd rollout` and `lopd eval`.
    """
    from vllm import SamplingParams

    n = sampling.n
    base = SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=1,
                          stop=list(env.stop), include_stop_str_in_output=True,
                          logprobs=0 if logprobs else None, flat_logprobs=logprobs)
    max_len = _max_model_len(engine)
    limits = _scheduler_limits(engine)
    requests = [(g, ids) for g, ids in enumerate(prompt_ids) for _ in range(n)]
    out = [Trajectory() for _ in requests]
    active = list(range(len(requests)))
    for turn in range(int(env.max_calls) + 1):
        batch, params = [], []
        for r in active:
            context = requests[r][1] + out[r].response_ids
            budget = sampling.max_tokens - len(out[r].response_ids)
            if max_len:
                budget = min(budget, max_len - len(context))
            if budget <= 0:
                out[r].finish_reason = "length"
                continue
            p = base.clone()
            p.max_tokens = budget
            p.seed = turn_seed(sampling.seed, r, turn)
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
            if max_len:
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


def _max_model_len(engine) -> int | None:
    try:
        return int(engine.llm_engine.model_config.max_model_len)
    except AttributeError:
        return None


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


def seeded(params, seed: int, count: int) -> list:
    """One copy of `params` per request, each with its own seed derived from (seed, request index).

    Samples then depend on the seed and the prompt's position only, not on what the engine ran before: rollouts
    are reproducible, and checkpoints evaluated on one engine in turn see the same random numbers (a paired
    comparison, which cancels sampling noise between arms).
    """
    copies = []
    for i in range(count):
        p = params.clone()
        p.seed = seed * 1_000_003 + i
        copies.append(p)
    return copies


def engine_version() -> str:
    import vllm

    return f"vllm-{vllm.__version__}"
