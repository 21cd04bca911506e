"""pipelines/qwen3_gpu.toml cannot run here (no GPU), so check what can be: it plans, every stage key means
something (the runner drops unknown keys silently, so a typo would quietly fall back to a default), and its
OPD stage carries the Lightning OPD settings."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from lopd.boxed import verify
from lopd.pipeline.plan import load_spec, plan
from lopd.pipeline.stages import pick
from lopd.prompts import PromptFormat
from lopd.rollout import SamplingConfig
from lopd.score import ScoreConfig
from lopd.train.trainer import TrainConfig, deepspeed_config

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "qwen3_gpu.toml"


def names(*classes) -> set[str]:
    return {f.name for cls in classes for f in fields(cls)}


STAGE_KEYS = {
    "rollout": names(SamplingConfig, PromptFormat) | {"model", "prompts", "verifier"},
    "score": names(ScoreConfig) | {"teacher", "rollouts"},
    "train": names(TrainConfig) | {"student", "cache", "rollouts"},
    "eval": names(PromptFormat) | {"models", "prompts", "verifier", "n", "temperature", "max_tokens"},
}


def test_recipe_plans_and_every_key_is_known(tmp_path):
    stages = plan(load_spec(RECIPE), tmp_path)[0].stages
    assert [s.kind for s in stages] == ["rollout", "train", "rollout", "score", "train", "eval"]
    for stage in stages:
        # the planner gives every stage its seed; `engine` is the stage's vLLM engine options (docs/engine.md)
        unknown = set(stage.params) - STAGE_KEYS[stage.kind] - {"seed", "engine"}
        assert not unknown, f"stage {stage.id}: unknown keys {unknown}"
        if stage.kind in ("rollout", "eval"):
            assert stage.params["chat"] is True


def test_recipe_carries_the_lightning_opd_settings(tmp_path):
    stages = {s.id: s.params for s in plan(load_spec(RECIPE), tmp_path)[0].stages}
    rollouts, opd = stages["student_rollouts"], stages["opd_lightning"]
    assert (rollouts["n"], rollouts["temperature"], rollouts["max_tokens"]) == (1, 0.8, 4096)
    assert opd["loss"] == "lightning" and opd["loss_args"] == {"clip": 10.0}
    assert (opd["lr"], opd["batch_size"], opd["weight_decay"], opd["betas"], opd["steps"]) == (2e-6, 256, 0.1, [0.9, 0.98], 150)
    assert opd["zero_stage"] == 3 and stages["teacher_cache"]["teacher"] == stages["teacher_sft_data"]["model"]


def test_deepspeed_zero3_config_is_what_the_opd_stage_builds_on_8_gpus(tmp_path):
    """configs/deepspeed_zero3.json documents the trainer's own config for the recipe; it must not drift from it."""
    written = json.loads((RECIPE.parent.parent / "configs" / "deepspeed_zero3.json").read_text())
    opd = {s.id: s.params for s in plan(load_spec(RECIPE), tmp_path)[0].stages}["opd_lightning"]
    assert written == deepspeed_config(pick(TrainConfig, opd), world=8)
    assert written["zero_optimization"]["stage"] == 3 and written["gradient_accumulation_steps"] == 32


def test_boxed_verifier():
    row = {"answer": "\\frac{1}{2}"}
    assert verify(row, "so $\\boxed{ \\frac{1}{2} }$.") == 1.0
    assert verify(row, "\\boxed{1} then \\boxed{\\frac{1}{2}}") == 1.0  # the last box counts
    assert verify(row, "\\boxed{0.5}") == 0.0  # exact match only
    assert verify(row, "\\boxed{\\frac{1}{2}") == 0.0  # unclosed
    assert verify({"answer": None}, "\\boxed{1}") == 0.0
