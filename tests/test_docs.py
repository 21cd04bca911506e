"""The docs stay true to the code and build cleanly.

docs/cli.md and the loss table of docs/losses.md must be what tools/gen_cli_docs.py generates from the click
commands and the loss registry today; `mkdocs build --strict` must pass (a broken link or anchor fails it); and the
README stays a landing page: short, its two set-up commands unchanged (CI runs the second), its links resolving on
GitHub.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest
from documented import README, ROOT, documented_commands

SETUP_COMMANDS = [
    ("bash tools/setup.sh && .venv/bin/lopd demo              # install (CPU stack, ~3 min) and run the end-to-end "
     "demo (~10-14 min on 2 cores)"),
    ("bash tools/setup.sh && .venv/bin/python -m pytest       # install if needed and run the tests (CI runs this via "
     ".ci/run)"),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[dev]'")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], check=False, capture_output=True, text=True, timeout=300)


def test_cli_reference_is_up_to_date(generator):
    assert (ROOT / "docs" / "cli.md").read_text() == generator.cli_reference(), (
        "docs/cli.md is out of date: run `python tools/gen_cli_docs.py` and commit it")


def test_cli_reference_shows_every_option_with_its_default(generator):
    from lopd.cli import main

    page = generator.cli_reference()
    train = page.split("## `lopd train`")[1]
    assert "| `--k` | integer (x>=1) | `32` |" in page
    assert "| `--loss` | text | required |" in train and "| `--betas` | 2 x float (0&lt;=x&lt;=1) | `0.9 0.98` |" in train
    for path, command in generator.walk(main, ("lopd",)):
        section = page.split(f"## `{' '.join(path)}`\n")[1].split("\n## ")[0]
        for option in (param for param in command.params if isinstance(param, click.Option)):
            assert f"| `{option.opts[0]}`" in section, (path, option.opts)


def test_loss_table_is_up_to_date(generator):
    page = (ROOT / "docs" / "losses.md").read_text()
    assert page == generator.losses_page(page), (
        "the loss table in docs/losses.md is out of date: run `python tools/gen_cli_docs.py` and commit it")


def test_a_loss_without_advice_stops_the_generator(generator, monkeypatch):
    monkeypatch.delitem(generator.WHEN, "rkl_topk")
    with pytest.raises(SystemExit, match="no advice for loss 'rkl_topk'"):
        generator.loss_table()


def test_docs_build_strict(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_strict_build_refuses_a_broken_anchor(tmp_path):
    """The build test would be worthless if a dead link passed: break one anchor in a copy and watch it fail."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "cost.md"
    page.write_text(page.read_text() + "\nSee [nowhere](cache-format.md#no-such-section).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no-such-section" in result.stderr


def test_readme_is_a_landing_page_with_the_set_up_commands_unchanged():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[2:6] == ["```bash", *SETUP_COMMANDS, "```"]
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert SETUP_COMMANDS[1].startswith(ci_command)


@pytest.mark.parametrize("page", ["README.md", "storage/README.md"])
def test_links_outside_the_book_resolve(page):
    """mkdocs checks the links inside docs/; these pages sit outside it, so check their relative links here."""
    source = ROOT / page
    for target in LINK.findall(source.read_text()):
        if "://" in target:
            continue
        path = (source.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page} links to {target}, which does not exist"
        assert path.is_relative_to(ROOT), target


def test_docs_show_commands():
    assert len(documented_commands()) >= 20


@pytest.mark.parametrize("where,argv", [(command.page, command.argv) for command in documented_commands()],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_documented_command_and_option_exists(where, argv):
    """The README and docs show commands that exist with options they take (checked against the click commands,
    without running them; tests/test_docs_walkthrough.py runs every one not marked GPU-only)."""
    from lopd.cli import main

    command, path = main, ["lopd"]
    words = list(argv)
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        name = words.pop(0)
        assert name in command.commands, f"{where}: `{' '.join(path)} {name}` is not a command"
        command, path = command.commands[name], [*path, name]
    assert not isinstance(command, click.Group) or not words, f"{where}: `{' '.join(path)}` needs a subcommand"
    options = {name for param in command.params for name in param.opts} | {"-h", "--help"}
    for word in words:
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"{where}: `{' '.join(path)}` has no option {word}"
    given = {word.split("=")[0] for word in words}
    for param in command.params:
        if isinstance(param, click.Option) and param.required:
            assert given & set(param.opts), f"{where}: `{' '.join(path)}` is shown without its required {param.opts[0]}"
