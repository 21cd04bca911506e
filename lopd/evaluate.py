"""`lopd eval`: a model's accuracy on a prompt set under a verifier, sampled with vLLM."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lopd.cost.ledger import record_stage
from lopd.engine import engine_context, running_context
from lopd.errors import LopdError
from lopd.models.loading import load_tokenizer, model_config, resolve_model
from lopd.prompts import PLAIN, PromptFormat, load_prompts
from lopd.environment import load_environment
from lopd.replicas import RayPlacement, replica_devices
from lopd.rollout import SamplingConfig, check_max_tokens, check_prompts, encode_prompts, sample_anywhere
from lopd.verifier import load_verifier


@dataclass
class EvalResult:
    accuracy: float  # mean verifier reward over every sample
    distinct_correct: int  # distinct correct responses: diversity of what the model gets right
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": round(self.accuracy, 4), "distinct_correct": self.distinct_correct, "samples": self.samples}


def evaluate(
    model: str,
    prompts: str | Path | list[dict[str, Any]],
    verifier: str,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    llm=None,
    root: Path | None = None,
    experiment: str = "default",
    prompt_format: PromptFormat = PLAIN,
    tool: str | None = None,
    engine_args: Mapping[str, Any] | None = None,
    placement: RayPlacement | None = None,
) -> EvalResult:
    """Sample `sampling.n` responses per prompt and score them. `llm`, if given, must already serve `model` (see
    EnginePool).

    Sampling goes through the same code as `lopd rollout` (lopd.rollout.generate / generate_with_tool), so an
    eval and a rollout with the same options see the same responses. `prompt_format` must be the one the model
    was trained with (a chat-trained model is evaluated through its chat template). `tool` (module:attr) runs the
    multi-turn tool loop of `lopd rollout --tool`; the verifier then sees the whole response, observations
    included. `engine_args` are vLLM engine options (checked by `lopd.engine.check_engine_args`); prompts are
    checked against the engine's context before it starts. `placement` samples on Ray replicas (lopd.replicas).
    """
    model = resolve_model(model)
    verify = load_verifier(verifier)
    if verify is None:
        raise LopdError("eval needs a verifier: pass --verifier module:function")
    load_environment(tool)  # a bad tool spec fails here, before any engine starts
    rows = load_prompts(prompts) if not isinstance(prompts, list) else prompts
    tokenizer = load_tokenizer(model)
    prompt_ids = encode_prompts(tokenizer, rows, prompt_format)
    context = running_context(llm) if llm is not None else engine_context(model, model_config(model), engine_args or {})
    check_max_tokens(sampling.max_tokens, context, model)
    sampling = sampling.within(context)
    check_prompts(rows, prompt_ids, context, skip_invalid=False)
    with record_stage(root, experiment=experiment, stage="eval", artifact=model) as rec:
        trajectories, _ = sample_anywhere(placement, llm, model, engine_args or {}, rows, prompt_ids, sampling, tool,
                                          context, logprobs=False)
        if placement is not None:
            rec.device_kind, rec.device_count = replica_devices(engine_args or {}, placement.replicas)
        result = _score([(rows[i // sampling.n], t.text) for i, t in enumerate(trajectories)], verify)
        rec.tokens = result.samples
        rec.extra = {"accuracy": result.accuracy, "distinct_correct": result.distinct_correct}
    return result


def _score(samples: list[tuple[dict[str, Any], str]], verify) -> EvalResult:
    """Mean verifier reward over (prompt row, response text) samples, and the distinct correct responses."""
    total, correct = 0.0, set()
    for row, text in samples:
        reward = float(verify(row, text))
        total += reward
        if reward > 0:
            correct.add((row["prompt"], text))
    return EvalResult(total / len(samples), len(correct), len(samples))
