"""`lopd rollout`: a model generates n samples per prompt with vLLM; tokens, behaviour log-probs and rewards go to Parquet.

Behaviour log-probs are the engine's raw log-probs of each sampled token (before temperature), i.e. log pi(y_t)
of the model itself, so importance weights pi_theta / pi_behaviour start at exactly 1 for the same weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lopd.cost.ledger import record_stage
from lopd.engine import build_llm, resolve_model
from lopd.errors import LopdError
from lopd.fingerprint import digest_json, model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.lineage import read_lineage
from lopd.prompts import PLAIN, PromptFormat, load_prompts
from lopd.rollout_set import RolloutSet, rollouts_dir, write_rollout_set
from lopd.verifier import load_verifier


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
) -> tuple[RolloutSet, bool]:
    """Generate (or find already generated) rollouts. Returns the set and whether it was reused."""
    prompt_format.validate()
    model = resolve_model(model)
    rows = load_prompts(prompts) if not isinstance(prompts, list) else prompts
    tokenizer = load_tokenizer(model)
    prompt_ids = encode_prompts(tokenizer, rows, prompt_format)
    identity = rollout_identity(model, tokenizer, sampling, rows, prompt_ids, verifier, prompt_format)
    set_id = "r-" + digest_json(identity)
    path = Path(out) if out else rollouts_dir(root) / set_id
    if (path / "meta.json").is_file():
        existing = RolloutSet.open(path)
        if existing.id == set_id:
            with record_stage(root, experiment=experiment, stage="rollout", artifact=set_id, inputs=[model]) as rec:
                rec.cache_hit = True
            return existing, True
    verify = load_verifier(verifier)
    with record_stage(root, experiment=experiment, stage="rollout", artifact=set_id, inputs=[model]) as rec:
        rollouts = _generate(model, rows, prompt_ids, tokenizer, sampling, verify, llm, quiet)
        rec.tokens = sum(len(r["response_ids"]) for r in rollouts)
    meta = dict(identity, id=set_id, model=model, lineage=read_lineage(model), engine=engine_version(),
                prompt_format=asdict(prompt_format), vocab_fingerprint=vocabulary_fingerprint(tokenizer))
    return write_rollout_set(path, rollouts, meta), False


def rollout_identity(model: str, tokenizer, sampling: SamplingConfig, rows: list[dict[str, Any]],
                     prompt_ids: list[list[int]], verifier: str | None, prompt_format: PromptFormat) -> dict[str, Any]:
    """Everything that determines a rollout set; its hash is the set id.

    The prompt format enters only when it is a chat format, so plain-text rollout sets keep the ids they had
    before chat templates were supported (their caches stay reachable).
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

    records = []
    for group_id, (row, ids, request) in enumerate(zip(rows, prompt_ids, outputs)):
        if list(request.prompt_token_ids) != ids:
            raise LopdError(f"vLLM generated prompt {row['id']} from other token ids than the ones given; "
                            f"the rollout set would not match its own prompts, so nothing was written")
        for sample_index, completion in enumerate(request.outputs):
            response = list(completion.token_ids)
            text = tokenizer.decode(response, skip_special_tokens=True)
            records.append(
                {
                    "prompt_id": row["id"],
                    "group_id": group_id,
                    "sample_index": sample_index,
                    "prompt": row["prompt"],
                    "answer": None if row.get("answer") is None else str(row["answer"]),
                    "prompt_ids": ids,
                    "response_ids": response,
                    "behaviour_logprobs": sampled_logprobs(completion.logprobs, response),
                    "finish_reason": str(completion.finish_reason),
                    "reward": None if verify is None else float(verify(row, text)),
                }
            )
    return records


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
