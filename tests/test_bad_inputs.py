"""Every bad command of issue 15: one line on stderr, exit code 2, no traceback, nothing written. No engine starts.

Each case runs through click's CliRunner against the real `lopd` command (lopd.cli.main), which is where the
one-line error handling lives. Before these checks, most of these commands exited 0 having done something else
(`--steps -5` saved the base model, `--rows-per-shard -1` made a "complete" set of 0 shards), crashed with a
ZeroDivisionError / DeepSpeed assert / torch ValueError, or reached vLLM and failed 30 s later with a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from toy_sets import one_row_rollout_set

from lopd.cli import main
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, str]:
    """A storage root with a tiny hand-made rollout set, a prompt file and pipeline files (no engine needed)."""
    root = tmp_path / "root"
    rollouts = one_row_rollout_set(root / "rollouts" / "r-test")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "ab=", "answer": "c"}) + "\n")
    head = f'[models]\nteacher = "{TEACHER_DIR}"\n[prompts]\np = {{ toy = "opd", n = 4 }}\n'
    bad_shards = tmp_path / "bad_shards.toml"
    bad_shards.write_text(head + '[[stages]]\nid = "r"\nrun = "rollout"\nmodel = "teacher"\nprompts = "p"\n'
                                 '[[stages]]\nid = "s"\nrun = "score"\nteacher = "teacher"\nrollouts = "r"\n'
                                 'rows_per_shard = 0\n')
    no_verifier = tmp_path / "no_verifier.toml"
    no_verifier.write_text(head + '[[stages]]\nid = "e"\nrun = "eval"\nmodels = ["teacher"]\nprompts = "p"\n')
    bad_top_p = tmp_path / "bad_top_p.toml"
    bad_top_p.write_text(head + '[[stages]]\nid = "r"\nrun = "rollout"\nmodel = "teacher"\nprompts = "p"\n'
                                'top_p = 1.5\n')
    foreign = tmp_path / "notes"  # an unrelated non-empty directory
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine\n")
    return {"root": str(root), "rollouts": str(rollouts.path), "prompts": str(prompts), "out": str(tmp_path / "out"),
            "foreign": str(foreign),
            "teacher": str(TEACHER_DIR), "student": str(STUDENT_BASE_DIR), "bad_shards": str(bad_shards),
            "no_verifier": str(no_verifier), "bad_top_p": str(bad_top_p)}


SCORE = ["score", "--teacher", "{teacher}", "--rollouts", "{rollouts}", "--out", "{out}"]
TRAIN = ["train", "--student", "{student}", "--rollouts", "{rollouts}", "--loss", "sft", "--out", "{out}"]
ROLLOUT = ["rollout", "--model", "{teacher}", "--prompts", "{prompts}", "--prompt-field", "question", "--out", "{out}"]
EVAL = ["eval", "--model", "{teacher}", "--prompts", "{prompts}", "--prompt-field", "question"]

CASES = {
    # issue 15 item 6: numbers
    "score rows-per-shard 0": (SCORE + ["--rows-per-shard", "0"], ["--rows-per-shard", "x>=1"]),
    "score rows-per-shard -1": (SCORE + ["--rows-per-shard", "-1"], ["--rows-per-shard"]),
    "score k 0": (SCORE + ["--k", "0"], ["--k"]),
    "score max-batch-tokens 0": (SCORE + ["--max-batch-tokens", "0"], ["--max-batch-tokens"]),
    "score context-slice -1": (SCORE + ["--context-slice", "-1"], ["--context-slice"]),
    "train steps -5": (TRAIN + ["--steps", "-5"], ["--steps", "x>=1"]),
    "train steps 0": (TRAIN + ["--steps", "0"], ["--steps"]),
    "train epochs 0": (TRAIN + ["--epochs", "0"], ["--epochs", "x>0"]),
    "train micro-batch-size 0": (TRAIN + ["--micro-batch-size", "0"], ["--micro-batch-size"]),
    "train warmup-steps -3": (TRAIN + ["--warmup-steps", "-3"], ["--warmup-steps", "x>=0"]),
    "train batch-size 0": (TRAIN + ["--batch-size", "0"], ["--batch-size"]),
    "train lr -1e-3": (TRAIN + ["--lr", "-1e-3"], ["--lr", "x>0"]),
    "train max-decoded-shards 0": (TRAIN + ["--max-decoded-shards", "0"], ["--max-decoded-shards"]),
    "rollout n 0": (ROLLOUT + ["--n", "0"], ["--n"]),
    "rollout max-tokens 0": (ROLLOUT + ["--max-tokens", "0"], ["--max-tokens"]),
    "rollout temperature -1": (ROLLOUT + ["--temperature", "-1"], ["--temperature", "x>=0"]),
    "rollout top-p 1.5": (ROLLOUT + ["--top-p", "1.5"], ["--top-p", "0<x<=1"]),
    "rollout top-p 0": (ROLLOUT + ["--top-p", "0"], ["--top-p"]),
    "eval n 0": (EVAL + ["--verifier", "lopd.toy.words:verify", "--n", "0"], ["--n"]),
    "pipeline rows_per_shard 0": (["run", "{bad_shards}"], ["stage 's'", "rows_per_shard = 0", "an integer >= 1"]),
    "pipeline top_p 1.5": (["run", "{bad_top_p}"], ["stage 'r'", "top_p = 1.5"]),
    # issue 15 item 2: eval's prompt fields and verifier
    "eval without verifier": (EVAL, ["--verifier"]),
    "eval wrong prompt field": (EVAL[:-1] + ["prompt_text", "--verifier", "lopd.toy.words:verify"],
                                ["'prompt_text'", "--prompt-field"]),
    "pipeline eval without verifier": (["run", "{no_verifier}"], ["stage 'e'", "verifier"]),
    # issue 15 item 4: repair names what it cannot find
    "cache repair of an unknown set": (["cache", "repair", "s-nope"], ["no score set matches 's-nope'"]),
    # --out an unrelated non-empty directory: refused before a lock file is made in it
    "score --out a non-empty directory": (SCORE[:-1] + ["{foreign}"], ["is not empty and holds no score set"]),
}


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))} if path.exists() else {}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_command_is_one_line_and_writes_nothing(world, tmp_path, name):
    args, needles = CASES[name]
    args = [a.format(**world) for a in args] + ["--root", world["root"]]
    before = tree(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert tree(tmp_path) == before  # nothing half-written: no --out, no manifest, no ledger row, no run state
