"""CPU engines get every core by default, and a `lopd score` process with them stops its engine before it exits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from lopd.engine import set_cpu_engine_env
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.rollout_set import write_rollout_set
from lopd.toy import TEACHER_DIR

TEACHER = str(TEACHER_DIR)
# What an exit-time teardown race looks like: an abort, a fatal interpreter error, vLLM's engine-core monitor
# cleaning up after an engine core it did not see shut down, or an engine core killed mid-teardown.
EXIT_RACE_SIGNS = ("Aborted", "Fatal Python error", "terminate called", "core dumped",
                   "engine core exited unexpectedly", "force killing")


def test_cpu_engines_default_to_every_core_and_keep_an_explicit_choice(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    set_cpu_engine_env()
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    set_cpu_engine_env()
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


@pytest.mark.slow
def test_lopd_score_on_every_core_exits_cleanly(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"prompt_id": f"p{i}", "group_id": i, "sample_index": 0, "prompt": "", "answer": None,
             "prompt_ids": rng.integers(4, 64, 8).tolist(), "response_ids": rng.integers(4, 64, 24).tolist(),
             "behaviour_logprobs": (-rng.random(24)).tolist(), "finish_reason": "length", "reward": 0.0}
            for i in range(16)]
    tok = AutoTokenizer.from_pretrained(TEACHER)
    meta = {"id": "r-exit", "model": TEACHER, "model_fingerprint": model_fingerprint(TEACHER),
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_fingerprint": vocabulary_fingerprint(tok)}
    rollouts = write_rollout_set(tmp_path / "rollouts" / "r-exit", rows, meta)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO")
    env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)  # lopd's default applies
    proc = subprocess.run([sys.executable, "-m", "lopd.cli", "score", "--teacher", TEACHER, "--rollouts",
                           str(rollouts.path), "--k", "4", "--root", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr  # vLLM logs to stdout
    assert proc.returncode == 0, log[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("\n{") :])["positions"] == 16 * 24  # lopd's result, after the logs
    assert "reserve_cpu_num=0" in log  # vLLM's worker was given every core
    assert "[shutdown] MPClient: complete" in log  # lopd stopped the engine itself
    assert not [sign for sign in EXIT_RACE_SIGNS if sign in log], log[-3000:]
