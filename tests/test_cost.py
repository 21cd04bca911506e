"""Cost ledger, amortisation arithmetic and the `lopd cost` / `lopd report` commands."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lopd.cost.amortize import aggregate, amortize, cost_to_target, experiment_accuracy, total
from lopd.cost.cli import cost, report
from lopd.cost.ledger import append_row, read_rows, record_stage
from lopd.errors import LopdError

GPU = {"device_kind": "cuda:NVIDIA H100 80GB HBM3", "device_count": 1}
CPU = {"device_kind": "cpu", "device_count": 2}


def _row(experiment: str, stage: str, seconds: float, **fields) -> dict:
    return {"experiment": experiment, "stage": stage, "wall_seconds": seconds, **GPU, **fields}


# The hand-computed example. Consumption: S (score set) scores R (rollout set); training consumes S.
#   A: rollout -> R (100 s), score R -> S (50 s), train "lightning" on S (10 s), eval 0.70 (5 s)
#   B: score S again: cache hit (0 s), train "rkl_topk" on S (20 s), eval 0.80 (5 s)
#   C: score S again: cache hit (0 s), train "gkd" on S (30 s), eval 0.85 (5 s)
# R and S are used by A, B and C (B and C use R through S), so each pays (100 + 50) / 3 = 50 shared.
EXAMPLE = [
    _row("A", "rollout", 100, method="vllm-t1", artifact="R", tokens=4000),
    _row("A", "score", 50, artifact="S", inputs=["R"], tokens=4000),
    _row("A", "train", 10, method="lightning", artifact="ckpt-A", inputs=["S"], tokens=2_000_000),
    _row("A", "eval", 5, inputs=["ckpt-A"], extra={"accuracy": 0.70}),
    _row("B", "score", 3, artifact="S", cache_hit=True),
    _row("B", "train", 20, method="rkl_topk", artifact="ckpt-B", inputs=["S"], tokens=1_000_000),
    _row("B", "eval", 5, inputs=["ckpt-B"], extra={"accuracy": 0.80}),
    _row("C", "score", 3, artifact="S", cache_hit=True),
    _row("C", "train", 30, method="gkd", artifact="ckpt-C", inputs=["S"], tokens=1_000_000),
    _row("C", "eval", 5, inputs=["ckpt-C"], extra={"accuracy": 0.85}),
]


@pytest.fixture
def example_root(tmp_path: Path) -> Path:
    for row in EXAMPLE:
        append_row(tmp_path, row)
    return tmp_path


def _by(groups) -> dict[str, tuple[float, float]]:
    """(shared, marginal) device seconds per group key, rounded so hand-computed thirds compare equal."""
    return {g.key: (round(g.shared_device_seconds, 6), round(g.marginal_device_seconds, 6)) for g in groups}


def test_rows_round_trip(tmp_path: Path):
    stored = append_row(tmp_path, _row("A", "score", 7.5, artifact="S", inputs=["R"], tokens=12, extra={"k": 8}))
    (read,) = read_rows(tmp_path)
    assert read == stored
    assert read["device_seconds"] == 7.5 and read["inputs"] == ["R"] and read["extra"] == {"k": 8}
    assert read["ended_at"] - read["started_at"] == pytest.approx(7.5)
    timed = append_row(tmp_path, {"experiment": "A", "stage": "eval", "started_at": 100, "ended_at": 130, **CPU})
    assert (timed["wall_seconds"], timed["device_seconds"]) == (30, 60)


def test_cache_hit_costs_nothing_and_device_seconds_scale_with_devices(tmp_path: Path):
    hit = append_row(tmp_path, {"experiment": "B", "stage": "score", "wall_seconds": 4, "cache_hit": True, **CPU})
    run = append_row(tmp_path, {"experiment": "B", "stage": "train", "wall_seconds": 4, **CPU})
    assert hit["device_seconds"] == 0 and run["device_seconds"] == 8


def test_bad_rows_are_one_line_errors(tmp_path: Path):
    with pytest.raises(LopdError, match="unknown ledger field 'stgae'"):
        append_row(tmp_path, {"experiment": "A", "stgae": "train", **CPU})
    with pytest.raises(LopdError, match="list of artifact ids"):
        append_row(tmp_path, {"experiment": "A", "stage": "train", "inputs": "S", **CPU})
    assert read_rows(tmp_path) == []


def test_record_stage_times_the_block_and_records_failures(tmp_path: Path):
    with record_stage(tmp_path, experiment="A", stage="score", inputs=["R"]) as rec:
        rec.artifact, rec.tokens, rec.device_kind, rec.device_count = "S", 42, "cpu", 3
    with pytest.raises(ValueError):
        with record_stage(tmp_path, experiment="A", stage="train", method="gkd") as rec:
            rec.device_kind, rec.device_count = "cpu", 1
            raise ValueError("boom")
    ok, failed = read_rows(tmp_path)
    assert (ok["artifact"], ok["inputs"], ok["tokens"], ok["device_count"]) == ("S", ["R"], 42, 3)
    assert ok["device_seconds"] == pytest.approx(3 * ok["wall_seconds"]) and ok["wall_seconds"] >= 0
    assert failed["method"] == "gkd" and failed["extra"] == {"failed": True, "error": "ValueError", "outcome": "failed"}
    assert (ok["outcome"], failed["outcome"]) == ("ok", "failed")
    assert not list((tmp_path / "ledger.open").iterdir())  # open-run files go once the row is written


def test_interrupted_and_killed_runs_are_recorded_as_killed_and_shown_apart(tmp_path: Path):
    """Before: a Ctrl-C'd run was recorded like any failure and a SIGKILLed one not at all, and `lopd cost`
    showed neither apart. Now both are outcome "killed" (the SIGKILLed one found by the next ledger read)."""
    import subprocess
    import sys

    append_row(tmp_path, _row("A", "train", 10, method="gkd"))
    with pytest.raises(KeyboardInterrupt):
        with record_stage(tmp_path, experiment="A", stage="score") as rec:
            rec.device_kind, rec.device_count = "cpu", 1
            raise KeyboardInterrupt
    script = ("import os, signal, time; from lopd.cost.ledger import record_stage\n"
              "with record_stage(os.environ['ROOT'], experiment='B', stage='train', method='rkl_topk') as rec:\n"
              "    rec.device_kind, rec.device_count = 'cpu', 1\n"
              "    time.sleep(0.3); os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script], env={**__import__("os").environ, "ROOT": str(tmp_path)})
    assert killed.returncode == -9
    assert [r["outcome"] for r in read_rows(tmp_path)] == ["ok", "killed"]  # the SIGKILLed run wrote nothing

    summary = json.loads(CliRunner().invoke(cost, ["--root", str(tmp_path), "--json"], catch_exceptions=False).output)
    assert [(u["outcome"], u["experiment"], u["stage"], u["runs"]) for u in summary["unfinished"]] == [
        ("killed", "A", "score", 1), ("killed", "B", "train", 1)]
    rows = read_rows(tmp_path)
    assert [r["outcome"] for r in rows] == ["ok", "killed", "killed"]
    assert rows[2]["method"] == "rkl_topk" and rows[2]["extra"]["error"] == "killed (no exit ran)"
    assert 0 <= rows[2]["wall_seconds"] < 5
    text = CliRunner().invoke(cost, ["--root", str(tmp_path)], catch_exceptions=False).output
    assert "runs that did not finish" in text
    assert len(read_rows(tmp_path)) == 3  # reaped once


def test_amortisation_of_the_hand_computed_example(example_root: Path):
    costs = amortize(read_rows(example_root))
    # shared: own train + eval, plus a third of R (100) and of S (50).
    assert _by(aggregate(costs, "experiment")) == {
        "A": (10 + 5 + 150 / 3, 100 + 50 + 10 + 5),
        "B": (20 + 5 + 150 / 3, 20 + 5),
        "C": (30 + 5 + 150 / 3, 30 + 5),
    }
    assert _by(aggregate(costs, "method")) == {"lightning": (65, 165), "rkl_topk": (75, 25), "gkd": (85, 35)}
    assert _by(aggregate(costs, "stage")) == {"rollout": (100, 100), "score": (50, 50), "train": (60, 60), "eval": (15, 15)}
    # B pays a third of the rollout it never ran, in the rollout stage.
    (b_rollout,) = [c for c in costs if c.experiment == "B" and c.stage == "rollout"]
    assert (b_rollout.shared_device_seconds, b_rollout.marginal_device_seconds) == pytest.approx((100 / 3, 0))
    both = total(costs)
    assert both.shared_device_seconds == pytest.approx(both.marginal_device_seconds) == pytest.approx(225)


def test_partial_reuse_shares_only_what_is_used(tmp_path: Path):
    # D scores R with another teacher (S2, 40 s) and trains on S2: it shares R with A but not S.
    for row in EXAMPLE[:3] + [
        _row("D", "score", 40, artifact="S2", inputs=["R"]),
        _row("D", "train", 10, method="gkd", inputs=["S2"]),
    ]:
        append_row(tmp_path, row)
    assert _by(aggregate(amortize(read_rows(tmp_path)), "experiment")) == {"A": (50 + 50 + 10, 160), "D": (50 + 40 + 10, 50)}


def test_cost_per_million_trained_tokens(example_root: Path):
    groups = {g.key: g for g in aggregate(amortize(read_rows(example_root)), "method")}
    assert groups["lightning"].trained_tokens == 2_000_000  # rollout/score tokens are not trained tokens
    assert groups["lightning"].per_million_tokens("shared") == pytest.approx(65 / 2)
    assert groups["gkd"].per_million_tokens("marginal") == pytest.approx(35)
    assert aggregate(amortize(read_rows(example_root)), "stage")[0].per_million_tokens("shared") is None


def test_cost_to_target_accuracy(example_root: Path):
    rows = read_rows(example_root)
    results = {t.method: t for t in cost_to_target(amortize(rows), experiment_accuracy(rows), 0.75)}
    assert results["gkd"].experiment == "C" and results["gkd"].shared_device_seconds == pytest.approx(85)
    assert results["rkl_topk"].shared_device_seconds == pytest.approx(75)
    assert results["lightning"].experiment is None and results["lightning"].accuracy == 0.70


def test_cost_json_and_csv(example_root: Path):
    args = ["--root", str(example_root), "--by", "method", "--price-per-device-hour", "3.6"]
    out = CliRunner().invoke(cost, [*args, "--json", "--target-accuracy", "0.8"], catch_exceptions=False).output
    summary = json.loads(out)
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["unit"] == "GPU-hours"
    assert rows["gkd"]["shared_device_hours"] == pytest.approx(85 / 3600)
    assert rows["gkd"]["shared_cost"] == pytest.approx(85 / 1000)
    assert rows["gkd"]["marginal_device_hours_per_mtok"] == pytest.approx(35 / 3600)
    assert rows["gkd"]["accuracy"] == 0.85
    assert {t["method"]: t["experiment"] for t in summary["to_target"]} == {
        "gkd": "C", "lightning": None, "rkl_topk": "B"
    }

    out = CliRunner().invoke(cost, [*args, "--csv", "--view", "marginal"], catch_exceptions=False).output
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["method"] for r in table] == ["gkd", "lightning", "rkl_topk"]
    assert "shared_device_hours" not in table[0]
    assert float(table[1]["marginal_device_hours"]) == pytest.approx(165 / 3600)


def test_cost_table_names_cpu_core_hours(tmp_path: Path):
    append_row(tmp_path, {"experiment": "A", "stage": "train", "method": "gkd", "wall_seconds": 1800, **CPU})
    result = CliRunner().invoke(cost, ["--root", str(tmp_path), "--price-per-device-hour", "2"], catch_exceptions=False)
    assert "CPU core-hours" in result.output and "shared CPU core-h" in result.output
    assert "shared cost" in result.output and "GPU" not in result.output


def test_empty_ledger_is_a_one_line_error(tmp_path: Path):
    result = CliRunner().invoke(cost, ["--root", str(tmp_path)])
    assert isinstance(result.exception, LopdError) and "has no rows" in str(result.exception)


def test_plot_and_report_files(example_root: Path, tmp_path: Path):
    png = tmp_path / "plots" / "cost.png"
    CliRunner().invoke(cost, ["--root", str(example_root), "--plot", str(png)], catch_exceptions=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    out = tmp_path / "site" / "report.md"
    CliRunner().invoke(report, ["--root", str(example_root), "--out", str(out)], catch_exceptions=False)
    page = out.read_text()
    assert "![" in page and "(report.png)" in page and (out.parent / "report.png").stat().st_size > 1000
    assert "| S | score | A |" in page  # S reused by three experiments
    assert "lightning" in page and "0.85" in page


def test_train_runs_of_two_losses_under_the_default_experiment_cost_apart(tmp_path: Path, monkeypatch):
    """Before: `lopd train` recorded every run under experiment "default", so two losses trained without
    --experiment merged into one "lightning+rkl_topk" row of `lopd cost`. Now the default is named per loss.
    The trainer is a stand-in that records its ledger row as the real one does (experiment, stage, method)."""
    from transformers import AutoTokenizer

    import lopd.train.trainer
    from lopd.cli import main
    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
    from lopd.rollout_set import write_rollout_set
    from lopd.toy import STUDENT_BASE_DIR

    def fake_train(student, source, config, out_dir, *, root, experiment, **kwargs):
        with record_stage(root, experiment=experiment, stage="train", method=config.loss, artifact=str(out_dir),
                          inputs=[source.id]) as rec:
            rec.device_kind, rec.device_count = "cpu", 1
        raise LopdError("trained")  # the stand-in has no checkpoint to report

    monkeypatch.delenv("LOPD_EXPERIMENT", raising=False)
    monkeypatch.setattr(lopd.train.trainer, "train", fake_train)
    model = str(STUDENT_BASE_DIR)
    meta = {"id": "r-one", "model": model, "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(model))}
    records = [{"prompt_id": "p0", "group_id": 0, "sample_index": 0, "prompt": "ab=", "answer": "c",
                "prompt_ids": [1, 4, 5, 40], "response_ids": [6, 2], "behaviour_logprobs": [-1.0, -0.5],
                "finish_reason": "stop", "reward": 1.0}]
    write_rollout_set(tmp_path / "rollouts" / "r-one", records, meta)
    for loss in ("lightning", "rkl_topk"):
        result = CliRunner().invoke(main, ["train", "--student", model, "--rollouts", "r-one", "--loss", loss,
                                           "--out", str(tmp_path / loss), "--root", str(tmp_path)])
        assert "error: trained" in result.stderr, result.output
    assert [(r["experiment"], r["method"]) for r in read_rows(tmp_path)] == [
        ("default-lightning", "lightning"), ("default-rkl_topk", "rkl_topk")]
    summary = json.loads(CliRunner().invoke(cost, ["--root", str(tmp_path), "--json"], catch_exceptions=False).output)
    assert [r["method"] for r in summary["rows"]] == ["lightning", "rkl_topk"]
    named = CliRunner().invoke(main, ["train", "--student", model, "--rollouts", "r-one", "--loss", "sft",
                                      "--experiment", "mine", "--out", str(tmp_path / "sft"), "--root", str(tmp_path)])
    assert "error: trained" in named.stderr and read_rows(tmp_path)[-1]["experiment"] == "mine"
