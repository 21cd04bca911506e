"""Bad input: one line on stderr, exit code 2, no traceback and nothing half-written. No engine starts here."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from toy_sets import one_row_rollout_set

from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR
from lopd.toy.tokenizer import build_char_tokenizer


def lopd(*args: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lopd.cli", *args, "--root", str(root)], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def rollout_set(tmp_path):
    """A tiny hand-made rollout set of the toy student (no engine needed)."""
    return one_row_rollout_set(tmp_path / "root" / "rollouts" / "r-test")


def test_missing_model_path(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ab="}) + "\n")
    result = lopd("rollout", "--model", str(tmp_path / "nope"), "--prompts", str(prompts), root=tmp_path)
    assert_one_line_error(result, "does not exist")


def test_prompts_in_wrong_format(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "ab="}\n')
    result = lopd("rollout", "--model", str(TEACHER_DIR), "--prompts", str(bad), root=tmp_path)
    assert_one_line_error(result, "'prompt'", "line 1")
    text = tmp_path / "p.txt"
    text.write_text("ab=\n")
    assert_one_line_error(lopd("rollout", "--model", str(TEACHER_DIR), "--prompts", str(text), root=tmp_path),
                          "unknown format '.txt'", "JSON Lines")
    assert not (tmp_path / "rollouts").exists()


def test_teacher_with_different_vocabulary(tmp_path, rollout_set):
    other = tmp_path / "other_teacher"
    shutil.copytree(TEACHER_DIR, other)
    build_char_tokenizer("zyxwvutsrqponmlkjihgfedcba0123456789=+-*/()[]<>:;,.?! _#@$%&").save_pretrained(other)
    result = lopd("score", "--teacher", str(other), "--rollouts", str(rollout_set.path), root=tmp_path / "root")
    assert_one_line_error(result, "different vocabularies", "cross-tokenizer distillation is not supported")
    assert not (tmp_path / "root" / "scores").exists()


def test_k_larger_than_engine_allows(tmp_path, rollout_set):
    result = lopd("score", "--teacher", str(TEACHER_DIR), "--rollouts", str(rollout_set.path), "--k", "100",
                  root=tmp_path / "root")
    assert_one_line_error(result, "--k 100", "vocabulary (64)")


def test_output_path_holding_a_different_cache(tmp_path, rollout_set):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"id": "s-someone-else", "rows_per_shard": 8, "shards": {}}))
    result = lopd("score", "--teacher", str(TEACHER_DIR), "--rollouts", str(rollout_set.path), "--out", str(out),
                  root=tmp_path / "root")
    assert_one_line_error(result, "already holds a different score set")
    assert json.loads((out / "manifest.json").read_text())["id"] == "s-someone-else"


def test_unknown_loss(tmp_path, rollout_set):
    result = lopd("train", "--student", str(STUDENT_BASE_DIR), "--rollouts", str(rollout_set.path), "--loss", "nope",
                  "--out", str(tmp_path / "ck"), root=tmp_path / "root")
    assert_one_line_error(result, "unknown loss 'nope'", "lightning")


def test_loss_needing_a_missing_field(tmp_path, rollout_set):
    result = lopd("train", "--student", str(STUDENT_BASE_DIR), "--rollouts", str(rollout_set.path), "--loss", "rkl_topk",
                  "--out", str(tmp_path / "ck"), root=tmp_path / "root")
    assert_one_line_error(result, "needs 'topk'", "lopd score")


def test_version_prints_the_package_version():
    from importlib.metadata import version

    from click.testing import CliRunner

    from lopd.cli import main

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"lopd {version('lopd')}\n"


VERIFIER_FILE = "def verify(prompt, response):\n    return float(response.strip() == prompt['answer'])\nNOT_CALLABLE = 3\n"


def test_verifier_from_a_file_relative_to_the_current_directory(tmp_path, monkeypatch):
    """Before: only `module:function`, so a verifier in a local file needed PYTHONPATH."""
    from lopd.verifier import absolute_spec, load_plugin, load_verifier

    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "my_verifier.py").write_text(VERIFIER_FILE)
    monkeypatch.chdir(tmp_path)
    verify = load_verifier("checks/my_verifier.py:verify")
    assert verify({"answer": "c"}, " c") == 1.0 and verify({"answer": "c"}, "d") == 0.0
    assert load_verifier(f"{tmp_path}/checks/my_verifier.py:verify") is verify  # one module per file
    assert absolute_spec("checks/my_verifier.py:verify") == f"{tmp_path}/checks/my_verifier.py:verify"
    assert absolute_spec("lopd.toy.words:verify") == "lopd.toy.words:verify"
    assert load_plugin("checks/my_verifier.py:NOT_CALLABLE", must_be_callable=False) == 3


@pytest.mark.parametrize("spec,needles", [
    ("checks/nope.py:verify", ["cannot load verifier 'checks/nope.py:verify'", "no file", "current directory"]),
    ("checks/my_verifier.py:score", ["cannot load verifier", "has no attribute 'score'"]),
    ("checks/my_verifier.py:NOT_CALLABLE", ["is not callable"]),
    ("checks/my_verifier.py", ["path/to/file.py:function"]),
    ("lopd.toy.words:nope", ["cannot load verifier", "has no attribute 'nope'"]),
])
def test_bad_verifier_file_is_one_line_before_any_engine(tmp_path, monkeypatch, spec, needles):
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "my_verifier.py").write_text(VERIFIER_FILE)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ab=", "answer": "c"}) + "\n")
    monkeypatch.chdir(tmp_path)
    result = lopd("eval", "--model", str(TEACHER_DIR), "--prompts", str(prompts), "--verifier", spec,
                  root=tmp_path / "root")
    assert_one_line_error(result, *needles)


@pytest.mark.parametrize("args,needle", [
    (("--replicas", "2"), "--replicas needs --ray"),
    (("--ray-address", "auto"), "--ray-address needs --ray"),
    (("--ray", "--shard", "1/2"), "drop --shard"),
])
def test_ray_options_are_checked_before_anything_starts(rollout_set, tmp_path, args, needle):
    result = lopd("score", "--teacher", str(TEACHER_DIR), "--rollouts", str(rollout_set.path), *args,
                  root=tmp_path / "root")
    assert_one_line_error(result, needle)
