"""`lopd run`: stage expansion, content keys, the dry-run plan, and resuming without redoing finished stages."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from lopd.cost.ledger import read_rows
from lopd.errors import LopdError
from lopd.pipeline.plan import expand_stages, load_spec, plan
from lopd.pipeline.run import run_pipeline

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.fixture()
def smoke():
    return load_spec(PIPELINES / "smoke_toy.toml")


def keys(spec, root) -> dict[str, str]:
    return {s.id: s.key for s in plan(spec, root)[0].stages}


def test_shipped_pipelines_parse_and_plan(tmp_path):
    for path in sorted(PIPELINES.glob("*.toml")):
        assert plan(load_spec(path), tmp_path), path


def test_matrix_expands_with_overrides(smoke):
    stages = {s.id: s for s in expand_stages(smoke)}
    assert stages["opd_lightning"].params["loss"] == "lightning" and stages["opd_lightning"].params["lr"] == 1e-4
    assert stages["opd_rkl_topk"].params["lr"] == 1e-3


def test_keys_follow_inputs(smoke, tmp_path):
    before = keys(smoke, tmp_path)
    assert keys(copy.deepcopy(smoke), tmp_path) == before
    changed = copy.deepcopy(smoke)
    next(s for s in changed["stages"] if s["id"] == "teacher_cache")["k"] = 16
    after = keys(changed, tmp_path)
    assert after["teacher_cache"] != before["teacher_cache"]
    assert after["opd_rkl_topk"] != before["opd_rkl_topk"] and after["eval"] != before["eval"]  # downstream
    assert after["sft"] == before["sft"] and after["sft_more"] == before["sft_more"]  # unrelated


def test_unknown_reference_is_a_clear_error(smoke, tmp_path):
    broken = copy.deepcopy(smoke)
    next(s for s in broken["stages"] if s["id"] == "teacher_cache")["rollouts"] = "nope"
    with pytest.raises(LopdError, match="rollouts 'nope' is neither a model"):
        plan(broken, tmp_path)


def test_ray_table_places_score_stages_without_changing_any_stage_key(smoke, tmp_path):
    from lopd.pipeline.plan import ray_placement
    from lopd.replicas import RayPlacement

    placed = dict(copy.deepcopy(smoke), ray={"replicas": 2, "address": "auto"})
    assert ray_placement(placed) == RayPlacement(replicas=2, address="auto") and ray_placement(smoke) is None
    assert keys(placed, tmp_path) == keys(smoke, tmp_path)
    for table, message in (({"replicas": 0}, "replicas must be an integer >= 1"), ({"nodes": 2}, "takes replicas")):
        with pytest.raises(LopdError, match=message):
            plan(dict(copy.deepcopy(smoke), ray=table), tmp_path)


@pytest.mark.slow
def test_interrupted_pipeline_resumes_without_redoing_finished_stages(smoke, tmp_path, capsys):
    broken = copy.deepcopy(smoke)
    next(s for s in broken["stages"] if s["id"] == "sft_more")["loss"] = "no_such_loss"
    with pytest.raises(LopdError, match="unknown loss"):
        run_pipeline(broken, tmp_path)
    runs_before = [r for r in read_rows(tmp_path) if not r["extra"].get("failed")]
    capsys.readouterr()
    run_pipeline(smoke, tmp_path, dry_run=True)
    plan_lines = capsys.readouterr().out.splitlines()
    assert all("reuse" in line for line in plan_lines if line.split()[-1] in
               ("teacher_sft_data", "sft", "student_rollouts", "teacher_cache", "opd_lightning", "opd_rkl_topk",
                "teacher_more_data"))
    assert all("run" in line for line in plan_lines if line.split()[-1] in ("sft_more", "online_rkl_topk", "eval"))
    results = run_pipeline(smoke, tmp_path)
    new_rows = [r for r in read_rows(tmp_path)[len(runs_before):] if not r["extra"].get("failed")]
    redone = {r["experiment"].split("/")[-1] for r in new_rows if r["stage"] in ("rollout", "score", "sft", "train")}
    assert redone == {"sft_more", "online_rkl_topk"}
    assert set(results["seeds"]["0"]["evals"]) >= {"sft", "sft_more", "opd_lightning", "opd_rkl_topk", "teacher"}
    # The cost ledger holds a row for every stage the pipeline ran, under the pipeline's experiment names.
    rows = [r for r in read_rows(tmp_path) if r["experiment"].startswith("smoke_toy/seed0/")]
    assert {r["stage"] for r in rows} == {"rollout", "score", "sft", "train", "eval"}
    assert all(r["device_seconds"] > 0 for r in rows if not r["cache_hit"])
