"""A pipeline file turned into a plan: its models, prompt sets and stages, each stage keyed by its inputs.

Nothing here starts an engine: `lopd run --dry-run` stops at the plan (lopd.pipeline.stages runs it).
"""
from __future__ import annotations

import fnmatch
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lopd import location
from lopd.errors import LopdError
from lopd.fingerprint import digest_json
from lopd.limits import check_params
from lopd.location import Location
from lopd.storage import read_json, write_json

STAGE_KINDS = ("rollout", "score", "train", "eval")
MODEL_ENTRY_KEYS = ("path", "engine")


def model_source(name: str, entry: Any) -> str:
    """A [models] entry's path or hub name: the entry itself, or the `path` of a `{ path, engine }` table."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("path"), str) and set(entry) <= set(MODEL_ENTRY_KEYS):
        return entry["path"]
    raise LopdError(f"pipeline model {name!r}: expected a path or hub name, or a table with `path` and optionally "
                    f"`engine` (vLLM engine options), got {entry!r}")


def engine_tables(spec: dict[str, Any], params: dict[str, Any], model_ref: str | None,
                  stage_id: str) -> list[tuple[str, dict]]:
    """The engine option tables that apply to one engine, weakest first: global, the model's, the stage's."""
    entry = spec.get("models", {}).get(model_ref) if model_ref else None
    tables = [("pipeline [engine]", spec.get("engine")),
              (f"pipeline model {model_ref!r} engine", entry.get("engine") if isinstance(entry, dict) else None),
              (f"pipeline stage {stage_id!r} engine", params.get("engine"))]
    for where, table in tables:
        if table is not None and not isinstance(table, dict):
            raise LopdError(f"{where}: expected a table of vLLM engine options (e.g. tensor_parallel_size = 4)")
    return [(where, table) for where, table in tables if table]


def stage_engine_args(spec: dict[str, Any], params: dict[str, Any], model_ref: str | None = None,
                      stage_id: str = "?") -> dict[str, Any]:
    """A stage's engine options for the engine of `model_ref`, checked and typed by vLLM's EngineArgs."""
    from lopd.engine import check_engine_args

    merged: dict[str, Any] = {}
    for where, table in engine_tables(spec, params, model_ref, stage_id):
        merged.update(check_engine_args(table, where))
    return merged


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LopdError(f"pipeline {path} does not exist; see pipelines/ for examples")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            spec = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            spec = yaml.safe_load(text)
        else:
            raise LopdError(f"pipeline {path}: expected a .toml or .yaml file")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise LopdError(f"pipeline {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    spec.setdefault("name", path.stem)
    return spec


@dataclass
class Stage:
    id: str
    kind: str
    params: dict[str, Any]
    reads: list[str] = field(default_factory=list)  # stage ids this stage depends on
    key: str = ""


def expand_stages(spec: dict[str, Any]) -> list[Stage]:
    """Stages in order, with `matrix` stages expanded (one per combination; `{name}` in the id is filled)."""
    stages: list[Stage] = []
    for raw in spec.get("stages", []):
        raw = dict(raw)
        kind = raw.pop("run", None)
        if kind not in STAGE_KINDS:
            raise LopdError(f"pipeline stage {raw.get('id', '?')!r}: `run` must be one of {', '.join(STAGE_KINDS)}")
        matrix = raw.pop("matrix", {})
        overrides = raw.pop("overrides", {})
        names = list(matrix)
        for values in itertools.product(*(matrix[n] for n in names)) if names else [()]:
            combo = dict(zip(names, values))
            params = {k: v for k, v in raw.items() if k != "id"}
            params.update(combo)
            for value in combo.values():
                params.update(overrides.get(str(value), {}))
            stage_id = raw.get("id", kind).format(**combo)
            if any(s.id == stage_id for s in stages):
                raise LopdError(f"pipeline stage id {stage_id!r} appears twice")
            stages.append(Stage(stage_id, kind, params))
    return stages


# Train-stage keys naming a score stage to attach -> the LossInputs field it fills (lopd.train.data.ATTACHABLE).
ATTACHED_STAGE_KEYS = {"base_cache": "base_logprobs", "contrast_cache": "contrast_logprobs"}
REFERENCE_FIELDS = {"rollout": ("model",), "score": ("teacher", "rollouts"),
                    "train": ("student", "rollouts", "cache", *ATTACHED_STAGE_KEYS, "teacher"), "eval": ("models",)}


def resolve_dependencies(stages: list[Stage], spec: dict[str, Any]) -> None:
    """Fill `reads` and each stage's key (hash of its params, the models/prompts it names and its inputs' keys)."""
    from lopd.engine import numeric_engine_args

    models = spec.get("models", {})
    prompts = spec.get("prompts", {})
    by_id: dict[str, Stage] = {}
    model_keys = {m: _model_key(spec, m) for m in models}
    for stage in stages:
        for name in REFERENCE_FIELDS[stage.kind]:
            refs = stage.params.get(name)
            for ref in refs if isinstance(refs, list) else [refs] if refs else []:
                matched = [s for s in by_id if fnmatch.fnmatchcase(s, ref)] if stage.kind == "eval" else (
                    [ref] if ref in by_id else [])
                if not matched and ref not in models:
                    raise LopdError(f"pipeline stage {stage.id!r}: {name} {ref!r} is neither a model in [models] "
                                    f"nor an earlier stage")
                stage.reads += matched
        if "prompts" in stage.params and stage.params["prompts"] not in prompts:
            raise LopdError(f"pipeline stage {stage.id!r}: prompts {stage.params['prompts']!r} is not in [prompts]")
        content = {
            "kind": stage.kind, "params": {k: v for k, v in stage.params.items() if k != "engine"},
            "inputs": [by_id[r].key for r in stage.reads], "models": model_keys,
            "prompts": prompts.get(stage.params.get("prompts")),
        }
        numeric = numeric_engine_args(stage_engine_args(spec, stage.params, stage_id=stage.id))
        if numeric:  # only when set, so pipelines without engine options keep their stage keys
            content["engine"] = numeric
        stage.key = digest_json(content)
        by_id[stage.id] = stage


def _model_key(spec: dict[str, Any], name: str) -> Any:
    """What a [models] entry contributes to stage keys: its path, plus its engine options that change numbers."""
    from lopd.engine import numeric_engine_args

    source = model_source(name, spec["models"][name])
    numeric = numeric_engine_args(stage_engine_args({"models": spec["models"]}, {}, name))
    return {"path": source, "engine": numeric} if numeric else source


class RunState:
    """Which stages of one (pipeline, seed) finished, with their keys and outputs; written after every stage, on
    this machine or in the bucket holding the storage root."""

    def __init__(self, path: Location):
        self.path = path
        self.done: dict[str, Any] = read_json(path)["stages"] if location.is_file(path) else {}

    def finished(self, stage: Stage) -> dict[str, Any] | None:
        entry = self.done.get(stage.id)
        if entry and entry["key"] == stage.key and location.exists(entry["output"]["path"]):
            return entry["output"]
        return None

    def record(self, stage: Stage, output: dict[str, Any], seconds: float) -> None:
        self.done[stage.id] = {"key": stage.key, "output": output, "seconds": round(seconds, 2)}
        write_json(self.path, {"stages": self.done})


@dataclass
class Plan:
    seed: int
    stages: list[Stage]
    state: RunState

    def describe(self) -> list[str]:
        return [f"seed {self.seed}  {'reuse' if self.state.finished(s) else 'run  '}  {s.kind:8s} {s.id}"
                for s in self.stages]


def check_stage(stage: Stage) -> None:
    """The checks the command line makes on the same options (lopd.limits), so a bad number in a pipeline file
    stops the run before its first engine starts, not a stage later."""
    check_params(stage.params, f"pipeline stage {stage.id!r}")
    if stage.kind == "eval" and not stage.params.get("verifier"):
        raise LopdError(f"pipeline stage {stage.id!r}: an eval stage needs `verifier = \"module:function\"`")
    if stage.kind == "train" and not stage.params.get("loss"):
        raise LopdError(f"pipeline stage {stage.id!r}: a train stage needs `loss = \"NAME\"` (e.g. \"rkl_topk\"; "
                        f"see `lopd losses`)")


def ray_placement(spec: dict[str, Any]):
    """The pipeline's `[ray]` table (`replicas = N`, `address = "..."`) as the placement of its rollout, score and
    eval stages, or None without one. Not part of any stage key: where a stage runs does not change its numbers
    (train stages' refresh and online engines stay in the training process)."""
    from lopd.replicas import RayPlacement

    table = spec.get("ray")
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) - {"replicas", "address"}:
        raise LopdError(f"pipeline [ray] takes replicas = N and address = \"...\", got {table!r}")
    replicas, address = table.get("replicas", 1), table.get("address")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise LopdError(f"pipeline [ray] replicas must be an integer >= 1, got {replicas!r}")
    if address is not None and not isinstance(address, str):
        raise LopdError(f"pipeline [ray] address must be a string, got {address!r}")
    return RayPlacement(replicas=replicas, address=address)


def runs_dir(root: Location, spec: dict[str, Any]) -> Location:
    """Where a pipeline keeps its state, trained models and results under the storage root."""
    return location.join(root, "runs", spec["name"])


def plan(spec: dict[str, Any], root: Location) -> list[Plan]:
    check_params({"max_logprobs": spec.get("max_logprobs")}, f"pipeline {spec['name']!r}")
    ray_placement(spec)  # its errors before any stage runs
    plans = []
    for seed in spec.get("seeds", [0]):
        stages = expand_stages(spec)
        for stage in stages:
            stage.params.setdefault("seed", seed)
            check_stage(stage)
        resolve_dependencies(stages, spec)
        plans.append(Plan(seed, stages, RunState(location.join(runs_dir(root, spec), f"seed{seed}", "state.json"))))
    return plans
