"""Every `lopd` command in the README and the docs runs as shown, except those in blocks marked `# GPU-only`.

Each page's commands run in order in one working directory and storage root, on the bundled toy models: the
placeholders a reader fills in (STUDENT, TEACHER, r-..., s-..., ID, ckpt/sft) become the toy models the README
names and the ids the earlier commands printed. The README's walkthrough (also docs/usage.md's) runs first, so the
pages that use its sets (alignment, cost, engine) find them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import subprocess_env
from documented import ROOT, DocumentedCommand, documented_commands

from lopd.toy import TEACHER_B_DIR, TEACHER_DIR

pytestmark = pytest.mark.slow
WALKTHROUGH_PAGES = ("README.md", "usage.md")


def runnable(page: str) -> list[DocumentedCommand]:
    return [command for command in documented_commands() if command.page == page and not command.gpu_only]


def placeholders(ids: dict[str, str]) -> dict[str, str]:
    """What a reader would type for each placeholder: the toy models, and the sets the earlier commands made."""
    return {"STUDENT": str(TEACHER_B_DIR), "TEACHER": str(TEACHER_DIR), "ckpt/sft": str(TEACHER_B_DIR),
            "r-...": ids.get("rollout_set", "r-..."),
            "s-...": ids.get("score_set", "s-..."), "ID": ids.get("score_set", "ID")}


def last_json_object(stdout: str) -> dict:
    """Commands print one indented JSON object last (`lopd train` may print a DeepSpeed line before it)."""
    start = stdout.rfind("\n{")
    try:
        value = json.loads(stdout[start + 1 if start >= 0 else 0:])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def run_page(page: str, workdir: Path, ids: dict[str, str]) -> list[dict]:
    """Run the page's commands in order; `ids` collects the rollout and score set ids they print."""
    outputs = []
    for command in runnable(page):
        words = [placeholders(ids).get(word, word) for word in command.argv]
        words = [str(ROOT / word) if word.startswith("lopd/toy/assets/") else word for word in words]
        assert not any("..." in word for word in words), f"{page}: no set yet for `lopd {' '.join(command.argv)}`"
        env = {**subprocess_env(), "LOPD_ROOT": str(workdir / "storage"), **command.env}
        result = subprocess.run([sys.executable, "-m", "lopd.cli", *words], check=False, cwd=workdir, env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"{page}: `lopd {' '.join(words)}` failed:\n{result.stderr[-3000:]}"
        output = last_json_object(result.stdout)
        if command.argv[0] in ("rollout", "score"):
            ids.update({key: output[key] for key in ("rollout_set", "score_set") if key in output})
        outputs.append(output)
    return outputs


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> tuple[Path, dict[str, str], list[dict]]:
    workdir, ids = tmp_path_factory.mktemp("walkthrough"), {}
    outputs = run_page(WALKTHROUGH_PAGES[0], workdir, ids)
    return workdir, ids, outputs


def test_the_readme_walkthrough_runs_as_shown(walkthrough):
    workdir, ids, _ = walkthrough
    assert ids["rollout_set"].startswith("r-") and ids["score_set"].startswith("s-")
    assert (workdir / "ckpt" / "config.json").exists() and (workdir / "file.parquet").stat().st_size > 0


def test_usage_page_shows_the_readme_walkthrough():
    """usage.md repeats the README's commands, so the run above covers both pages."""
    assert [c.argv for c in runnable("usage.md")] == [c.argv for c in runnable(WALKTHROUGH_PAGES[0])]


PAGES = sorted({command.page for command in documented_commands() if not command.gpu_only} - set(WALKTHROUGH_PAGES))


@pytest.mark.parametrize("page", PAGES)
def test_every_page_command_runs_as_shown(page, walkthrough):
    workdir, ids, _ = walkthrough
    run_page(page, workdir, dict(ids))
