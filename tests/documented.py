"""The `lopd ...` command lines shown in the README and the docs pages, parsed once for the tests that check them
(tests/test_docs.py: every command and option exists; tests/test_docs_walkthrough.py: every command not marked
GPU-only runs)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
ENV_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S*)$")
GPU_ONLY = "# GPU-only"


@dataclass(frozen=True)
class DocumentedCommand:
    """One documented command: its page, the words after `lopd`, the environment variables set before it on the
    line, and whether its code block opens with a `# GPU-only` comment (hub models or GPUs: not run by the tests)."""

    page: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    gpu_only: bool = False


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[DocumentedCommand]:
    """Every `lopd ...` command line in a code block of the README or a docs page, in page order.

    Continuation lines are joined and comments dropped; leading `VAR=value` assignments become `env`; `[--opt x]`
    (optional parts) are read as given; `lopd cache ls | show ID | ...` lists sibling subcommands."""
    found = []
    for page in pages():
        for block in FENCE.findall(page.read_text()):
            gpu_only = block.startswith(GPU_ONLY)
            for line in block.replace("\\\n", " ").splitlines():
                words = re.split(r"\s+#\s", line, maxsplit=1)[0].replace("[", " ").replace("]", " ").split()
                env = {}
                while words and (assignment := ENV_ASSIGNMENT.match(words[0])):
                    env[assignment[1]] = assignment[2]
                    words = words[1:]
                if not words or words[0].rsplit("/", 1)[-1] != "lopd":
                    continue
                parts = " ".join(words[1:]).split(" | ")
                group = parts[0].split()[:1]
                for argv in [parts[0].split(), *(group + part.split() for part in parts[1:])]:
                    found.append(DocumentedCommand(page.name, argv, env, gpu_only))
    return found
