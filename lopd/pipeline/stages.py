"""Running the stages of a pipeline plan: each kind maps its parameters onto the stage function it calls."""
from __future__ import annotations

import time
from dataclasses import asdict, fields, replace
from typing import Any

from lopd.cache.reader import open_cache
from lopd.engine import EnginePool, engine_context
from lopd.errors import LopdError
from lopd.evaluate import evaluate
from lopd.location import Location, join
from lopd.mirror import fetch, publish, writable_copy
from lopd.models.loading import load_tokenizer, model_config
from lopd.pipeline.plan import ATTACHED_STAGE_KEYS, Plan, Stage, model_source, ray_placement, stage_engine_args
from lopd.prompts import PromptFormat, load_prompts
from lopd.rollout import SamplingConfig, encode_prompts, rollout
from lopd.rollout_set import RolloutSet
from lopd.score import ScoreConfig, score
from lopd.storage import write_json
from lopd.train.checkpoint import CHECKPOINTS
from lopd.train.online import OnlineSampler
from lopd.train.refresh import RefreshContext
from lopd.train.trainer import TrainConfig, train

TOY_MODELS = {"toy:teacher": "TEACHER_DIR", "toy:teacher_b": "TEACHER_B_DIR", "toy:student_base": "STUDENT_BASE_DIR",
              "toy:calc_teacher": "CALC_TEACHER_DIR"}


def pick(cls, params: dict[str, Any]):
    """Build a config dataclass from the stage params it knows (the rest belong to the stage itself)."""
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in params.items() if k in names}
    if "betas" in known:
        known["betas"] = tuple(known["betas"])
    return cls(**known)


def resolve_model_ref(ref: str) -> str:
    if ref in TOY_MODELS:
        from lopd import toy

        return str(getattr(toy, TOY_MODELS[ref]))
    return ref


class StageRunner:
    """Executes plans against one storage root, sharing one vLLM engine per architecture across stages.

    The root may be a bucket: rollout and score sets are then written there, train stages train into a local mirror
    of their run directory (lopd.mirror) and publish the trained model (not the resumable checkpoints) to the bucket,
    and every model a stage loads is a local copy, fetched once when another machine trained it."""

    def __init__(self, spec: dict[str, Any], root: Location):
        self.spec = spec
        self.root = root
        self.placement = ray_placement(spec)  # rollout, score and eval stages on Ray replicas, or None
        self.pool: EnginePool | None = None
        self.prompt_cache: dict[str, list[dict[str, Any]]] = {}

    def engines(self) -> EnginePool:
        if self.pool is None:
            self.pool = EnginePool(max_logprobs=int(self.spec.get("max_logprobs", 64)))
        return self.pool

    def engine(self, stage: Stage, ref: str, model: str):
        """The pooled engine serving `model` (named `ref` in the pipeline) for `stage`, and its engine options; no
        engine when the pipeline's `[ray]` table places the stage on Ray replicas, which own theirs."""
        options = stage_engine_args(self.spec, stage.params, ref, stage.id)
        return (None if self.placement else self.engines().get(model, options)), options

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def prompts(self, name: str) -> list[dict[str, Any]]:
        if name not in self.prompt_cache:
            source = self.spec["prompts"][name]
            if "toy" in source:  # { toy = SPLIT, n = N, world = "words" | "calc" }
                from lopd.toy.worlds import toy_world

                world = toy_world(source.get("world", "words"))
                rows = [asdict(p) for p in world.make_prompts(source["toy"], int(source["n"]))]
            else:
                rows = load_prompts(source["path"], source.get("prompt_field", "prompt"),
                                    source.get("answer_field", "answer"))
            self.prompt_cache[name] = rows
        return self.prompt_cache[name]

    def run_plan(self, plan: Plan, out_dir: Location) -> dict[str, Any]:
        outputs: dict[str, dict[str, Any]] = {}
        evals: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        refreshes: dict[str, dict[str, float]] = {}
        for stage in plan.stages:
            done = plan.state.finished(stage)
            if done is None:
                start = time.perf_counter()
                done = getattr(self, f"run_{stage.kind}")(stage, outputs, out_dir, plan)
                plan.state.record(stage, done, time.perf_counter() - start)
            outputs[stage.id] = done
            if stage.kind == "train":
                seconds[stage.id] = plan.state.done[stage.id]["seconds"]
                if "refreshes" in done:
                    refreshes[stage.id] = {k: done[k] for k in ("refreshes", "rows_refreshed",
                                                                "refresh_rollout_seconds", "refresh_teacher_seconds")}
            if stage.kind == "eval":
                evals.update(done["results"])
        stage_seconds = {s.id: plan.state.done[s.id]["seconds"] for s in plan.stages}
        return {"evals": evals, "seconds": seconds, "stage_seconds": stage_seconds, "refreshes": refreshes,
                "outputs": outputs}

    # -- helpers
    def model_path(self, ref: str, outputs: dict[str, dict[str, Any]]) -> str:
        if ref in outputs:
            return str(fetch(outputs[ref]["path"]))
        return resolve_model_ref(model_source(ref, self.spec["models"][ref]))

    def experiment(self, plan: Plan, stage: Stage) -> str:
        return f"{self.spec['name']}/seed{plan.seed}/{stage.id}"

    # -- stage kinds
    def run_rollout(self, stage: Stage, outputs, out_dir: Location, plan: Plan) -> dict[str, Any]:
        p = stage.params
        model = self.model_path(p["model"], outputs)
        llm, options = self.engine(stage, p["model"], model)
        rollouts, reused = rollout(model, self.prompts(p["prompts"]), pick(SamplingConfig, p), root=self.root,
                                   verifier=p.get("verifier"), llm=llm, experiment=self.experiment(plan, stage),
                                   prompt_format=pick(PromptFormat, p), tool=p.get("tool"), judge=p.get("judge"),
                                   engine_args=options, placement=self.placement)
        return {"path": str(rollouts.path), "id": rollouts.id, "reused": reused}

    def run_score(self, stage: Stage, outputs, out_dir: Location, plan: Plan) -> dict[str, Any]:
        p = stage.params
        teacher = self.model_path(p["teacher"], outputs)
        rollouts = RolloutSet.open(outputs[p["rollouts"]]["path"])
        llm, options = self.engine(stage, p["teacher"], teacher)
        result = score(teacher, rollouts, pick(ScoreConfig, p), root=self.root, llm=llm,
                       experiment=self.experiment(plan, stage), engine_args=options, placement=self.placement)
        return {"path": str(result.path), "id": result.id, "reused": result.reused,
                "teacher_seconds": result.teacher_seconds}

    def run_train(self, stage: Stage, outputs, out_dir: Location, plan: Plan) -> dict[str, Any]:
        p = dict(stage.params)
        student = self.model_path(p["student"], outputs)
        config = pick(TrainConfig, p)
        if config.lora_rank:  # later stages load this model with vLLM: keep the merged model beside the adapter
            config = replace(config, merge_lora=True)
        batches = None
        if p.get("online"):
            source = None
            batches = self.online_sampler(p, student, outputs, config)
        elif "cache" in p:
            source = open_cache(outputs[p["cache"]]["path"], max_decoded_shards=config.max_decoded_shards)
        elif "rollouts" in p:
            source = RolloutSet.open(outputs[p["rollouts"]]["path"])
        else:
            raise LopdError(f"pipeline stage {stage.id!r}: a train stage needs `cache`, `rollouts` or `online = true`")
        attached = {field: open_cache(outputs[p[key]]["path"], max_decoded_shards=config.max_decoded_shards)
                    for key, field in ATTACHED_STAGE_KEYS.items() if key in p}
        refresh = None
        if config.refresh:
            refresh = RefreshContext(self.model_path(p["teacher"], outputs), self.engines(), self.root,
                                     self.experiment(plan, stage), stage_engine_args(self.spec, p, None, stage.id))
        # The state file has already decided this stage runs: checkpoints of an interrupted run of the same stage
        # (same key) resume, those of a stage whose parameters or inputs have changed since are discarded.
        run_dir = join(out_dir, stage.id)
        result = train(student, source, config, writable_copy(run_dir), batches=batches, root=self.root,
                       experiment=self.experiment(plan, stage), attached=attached, refresh_context=refresh,
                       restart_on_change=True, run_key=stage.key)
        published = publish(result.checkpoint, run_dir, exclude=[CHECKPOINTS])
        model = join(published, result.model.relative_to(result.checkpoint).as_posix())
        return {"path": str(model), "checkpoint": str(published), "steps": result.steps,
                "tokens": result.tokens, **result.refresh}

    def online_sampler(self, p: dict[str, Any], student: str, outputs, config: TrainConfig) -> OnlineSampler:
        """Online-OPD baseline: fresh samples from the model being trained, scored live by the teacher."""
        tok = load_tokenizer(student)
        prompt_ids = encode_prompts(tok, self.prompts(p["prompts"]), pick(PromptFormat, p))
        sampling = pick(SamplingConfig, p).within(engine_context(student, model_config(student), {}))
        return OnlineSampler(self.model_path(p["teacher"], outputs), prompt_ids, sampling,
                             k=int(p.get("k", ScoreConfig.k)), micro_batch_size=config.micro_batch_size or config.batch_size,
                             eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=config.seed)

    def run_eval(self, stage: Stage, outputs, out_dir: Location, plan: Plan) -> dict[str, Any]:
        p = stage.params
        refs = [r for r in stage.reads] + [m for m in p["models"] if m in self.spec.get("models", {})]
        results = {}
        for ref in refs:
            model = self.model_path(ref, outputs)
            llm, options = self.engine(stage, ref, model)
            results[ref] = evaluate(model, self.prompts(p["prompts"]), p["verifier"], pick(SamplingConfig, p),
                                    llm=llm, root=self.root, prompt_format=pick(PromptFormat, p),
                                    tool=p.get("tool"), engine_args=options, placement=self.placement,
                                    experiment=f"{self.spec['name']}/seed{plan.seed}/{ref}").as_dict()
        path = join(out_dir, f"{stage.id}.json")
        write_json(path, results)
        return {"path": str(path), "results": results}
