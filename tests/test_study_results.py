"""tools/study_results.py: the numbers the study pages quote (best learning rates, consistent minus inconsistent
with its standard error) from a small hand-made results.json."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("study_results", ROOT / "tools" / "study_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(tmp_path: Path, accuracies: dict[str, tuple[float, float]]) -> dict:
    seeds = {}
    for seed in (0, 1):
        outputs = {}
        for model in accuracies:
            out = tmp_path / f"seed{seed}" / model
            out.mkdir(parents=True)
            rows = [{"step": 10, "advantage": 0.1 + seed, "advantage_var": 2.0, "grad_norm": 1.0, "teacher_kl": 0.5},
                    {"step": 20, "advantage": 0.3 + seed, "advantage_var": 4.0, "grad_norm": 3.0, "teacher_kl": 0.2}]
            (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            outputs[model] = {"path": str(out)}
        seeds[str(seed)] = {"evals": {m: {"accuracy": a[seed]} for m, a in accuracies.items()}, "outputs": outputs}
    return {"seeds": seeds}


def test_consistency_difference_and_its_standard_error(tool, tmp_path):
    study = tool.consistency_study(results(tmp_path, {
        "opd_rkl_topk_cache_a": (0.95, 0.97), "opd_rkl_topk_cache_b": (0.90, 0.96), "sft": (0.88, 0.88)}))
    (row,) = study["losses"]
    assert row["loss"] == "rkl_topk" and row["difference"] == pytest.approx([5.0, 1.0])
    assert row["difference_mean"] == pytest.approx(3.0) and row["difference_se"] == pytest.approx(2.0)
    assert [r["model"] for r in study["references"]] == ["sft"]


def test_lightning_study_picks_each_methods_best_learning_rate_and_summarises_training(tool, tmp_path):
    study = tool.lightning_study(results(tmp_path, {
        "lightning_lr0.0001": (0.80, 0.82), "lightning_lr0.001": (0.86, 0.84), "rkl_topk_lr0.001": (0.95, 0.95)}))
    assert study["best_lr"]["lightning"]["lr"] == 1e-3 and study["best_lr"]["rkl_topk"]["mean"] == pytest.approx(95.0)
    first = study["arms"][0]
    assert first["advantage"] == pytest.approx(0.7) and first["advantage_var"] == pytest.approx(3.0)
    assert first["teacher_kl_start"] == 0.5 and first["teacher_kl_end"] == 0.2
    assert math.isclose(first["se"], 1.0)
    assert "| lightning | 0.001 | 85.0 ± 1.0 |" in tool.lightning_markdown(study)
