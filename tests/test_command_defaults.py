"""The commands agree with each other and with the library: same option names for the same things, defaults a
real model can use (top-k 32 as the docs use, responses bounded by the context rather than a toy-sized number),
and no silent choice of loss."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from lopd.cli import main
from lopd.errors import LopdError
from lopd.pipeline.plan import Stage, check_stage
from lopd.rollout import SCORING_ROOM, SamplingConfig
from lopd.score import ScoreConfig

SAMPLING_OPTIONS = {"--n": "n", "--temperature": "temperature", "--top-p": "top_p", "--max-tokens": "max_tokens",
                    "--seed": "seed"}
PROMPT_OPTIONS = {"--prompts", "--prompt-field", "--answer-field", "--chat", "--system-prompt"}


def options(command: click.Command) -> dict[str, click.Parameter]:
    return {name: param for param in command.params for name in param.opts}


@pytest.mark.parametrize("command", ["rollout", "eval"])
def test_sampling_commands_share_options_and_library_defaults(command):
    have = options(main.commands[command])
    assert PROMPT_OPTIONS | set(SAMPLING_OPTIONS) <= set(have)
    for flag, field in SAMPLING_OPTIONS.items():
        assert have[flag].default == getattr(SamplingConfig(), field), flag


def test_score_defaults_are_the_library_defaults_and_the_docs_k():
    have = options(main.commands["score"])
    assert have["--k"].default == ScoreConfig().k == 32
    assert have["--rows-per-shard"].default == ScoreConfig().rows_per_shard
    assert have["--max-batch-tokens"].default == ScoreConfig().max_batch_tokens


def test_unset_max_tokens_is_what_the_context_leaves():
    assert SamplingConfig().max_tokens is None
    assert SamplingConfig().within(4096).max_tokens == 4096 - 1 - SCORING_ROOM
    assert SamplingConfig(max_tokens=100).within(4096).max_tokens == 100
    assert SamplingConfig().within(None).max_tokens is None


def test_train_needs_an_explicit_loss(tmp_path):
    result = CliRunner().invoke(main, ["train", "--student", "x", "--cache", "y", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--loss" in result.output and "Traceback" not in result.output


def test_a_pipeline_train_stage_needs_a_loss():
    with pytest.raises(LopdError, match="needs `loss = "):
        check_stage(Stage(id="opd", kind="train", params={"student": "s", "cache": "c"}))
    check_stage(Stage(id="opd", kind="train", params={"student": "s", "cache": "c", "loss": "rkl_topk"}))
