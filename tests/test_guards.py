"""`check_training_inputs`: the student must share the cache's vocabulary and, for OPD, be the rollouts' policy.

Rollout and score sets are written by hand (no engine); models are copies of the toy student, made distinct
by a config field (the model fingerprint hashes config.json) and related by hand-written lopd_lineage.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from lopd.cache import open_cache
from lopd.cache.score_set import ScoreSetWriter
from lopd.errors import LopdError
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.models.guards import check_training_inputs, model_ancestry
from lopd.models.lineage import write_lineage
from lopd.rollout_set import RolloutSet, write_rollout_set
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR
from lopd.toy.tokenizer import build_char_tokenizer

RECORD = {"prompt_id": "p0", "group_id": 0, "sample_index": 0, "prompt": "ab=", "answer": "c",
          "prompt_ids": [1, 4, 5, 40], "response_ids": [6, 2], "behaviour_logprobs": [-1.0, -0.5],
          "finish_reason": "stop", "reward": 1.0}


def model_copy(tmp_path: Path, name: str, parent: Path | None = None) -> Path:
    """A copy of the toy student with its own fingerprint; with `parent`, recorded as trained from it."""
    path = tmp_path / name
    shutil.copytree(STUDENT_BASE_DIR, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, lopd_test_name=name)))
    if parent is not None:
        write_lineage(path, {"base_model": str(parent), "base_fingerprint": model_fingerprint(str(parent))})
    return path


def rollout_set(tmp_path: Path, generator: Path, record_vocabulary: bool = True) -> RolloutSet:
    tokenizer = AutoTokenizer.from_pretrained(generator)
    meta = {"id": "r-guard", "model": str(generator), "model_fingerprint": model_fingerprint(str(generator)),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    if record_vocabulary:
        meta["vocab_fingerprint"] = vocabulary_fingerprint(tokenizer)
    return write_rollout_set(tmp_path / "root" / "rollouts" / "r-guard", [RECORD], meta)


def score_set(rollouts: RolloutSet):
    """A complete one-shard score set of the toy teacher over `rollouts`, through the real writer."""
    path = rollouts.path.parent.parent / "scores" / "s-guard"
    teacher_tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    header = {"id": "s-guard", "kind": "score_set", "teacher": {"model": str(TEACHER_DIR), "fingerprint": "t"},
              "tokenizer_fingerprint": tokenizer_fingerprint(teacher_tokenizer),
              "rollout_set": {"id": rollouts.id, "content_digest": rollouts.meta["content_digest"],
                              "path": "../../rollouts/r-guard"},
              "config": {"k": 2, "logprob_dtype": "float16"}, "num_rows": 1}
    writer = ScoreSetWriter(path, header, rows_per_shard=1)
    arrays = {"offsets": np.array([0, 2], np.int64), "sampled_logprob": np.full(2, -1.0, np.float16),
              "topk_ids": np.array([[6, 7], [2, 3]], np.uint8), "topk_logprobs": np.full((2, 2), -1.0, np.float16),
              "tail_logprob": np.full(2, -2.0, np.float16)}
    for plan in writer.plan(1):
        with writer.claim(plan):
            writer.commit(plan, arrays)
    writer.finish(1)
    return open_cache(path)


@pytest.fixture()
def sft(tmp_path) -> Path:
    """The model that generated the rollouts (in the Lightning recipe: the SFT student)."""
    return model_copy(tmp_path, "sft")


@pytest.fixture()
def cache(tmp_path, sft):
    return score_set(rollout_set(tmp_path, sft))


def refused(student: Path, source, *needles: str) -> str:
    with pytest.raises(LopdError) as info:
        check_training_inputs(str(student), source)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_generating_model_and_its_descendants_pass(tmp_path, sft, cache):
    check_training_inputs(str(sft), cache)
    child = model_copy(tmp_path, "child", parent=sft)
    grandchild = model_copy(tmp_path, "grandchild", parent=child)
    check_training_inputs(str(grandchild), cache)
    assert model_ancestry(str(grandchild)) == [model_fingerprint(str(p)) for p in (grandchild, child, sft)]


def test_a_recorded_ancestor_counts_even_when_its_directory_is_gone(tmp_path, sft):
    child = model_copy(tmp_path, "child", parent=sft)
    grandchild = model_copy(tmp_path, "grandchild", parent=child)
    by_child = score_set(rollout_set(tmp_path / "c", child))
    by_sft = score_set(rollout_set(tmp_path / "s", sft))
    shutil.rmtree(child)
    check_training_inputs(str(grandchild), by_child)  # the grandchild's own lineage names the child
    # The walk stops at the missing directory: the sft model, recorded only in the child's lineage, is unknown.
    refused(grandchild, by_sft, "--allow-lineage-mismatch")


def test_an_unrelated_student_is_refused_with_both_models_and_the_fix(tmp_path, sft, cache):
    other = model_copy(tmp_path, "other")
    message = refused(other, cache, "rollout set r-guard", str(sft), model_fingerprint(str(sft)), str(other),
                      model_fingerprint(str(other)), "off-policy", "train the model that produced the rollouts",
                      "--allow-lineage-mismatch")
    assert message.startswith("rollout set r-guard was generated by")
    check_training_inputs(str(other), cache, allow_lineage_mismatch=True)


def test_the_parent_of_the_generating_model_is_refused(tmp_path, sft):
    """Training the base on its SFT child's rollouts is off-policy: lineage runs one way."""
    child = model_copy(tmp_path, "sft_child_as_generator", parent=sft)
    refused(sft, score_set(rollout_set(tmp_path / "b", child)), "--allow-lineage-mismatch")


def test_lineage_is_not_checked_for_sft_rollout_sets(tmp_path, sft):
    """SFT data comes from a teacher; only the vocabulary matters."""
    check_training_inputs(str(model_copy(tmp_path, "other")), rollout_set(tmp_path, sft))


@pytest.mark.parametrize("source", ["cache", "rollouts"])
def test_a_student_with_another_vocabulary_is_refused(tmp_path, sft, source):
    stranger = model_copy(tmp_path, "stranger", parent=sft)  # even a descendant: its ids mean other strings
    build_char_tokenizer("zyxwvutsrqponmlkjihgfedcba0123456789=+-*/()[]<>:;,.?! _#@$%&").save_pretrained(stranger)
    rollouts = rollout_set(tmp_path, sft)
    refused(stranger, score_set(rollouts) if source == "cache" else rollouts,
            "different vocabulary", "rollout set r-guard", "train a student with that tokenizer")


@pytest.mark.parametrize("record_vocabulary", [True, False])
def test_a_different_chat_template_with_the_same_vocabulary_passes(tmp_path, sft, record_vocabulary):
    """The fingerprints differ (chat template) but the ids mean the same; older sets compare via their model."""
    child = model_copy(tmp_path, "chat_child", parent=sft)
    tokenizer = AutoTokenizer.from_pretrained(child)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(child)
    cache = score_set(rollout_set(tmp_path, sft, record_vocabulary))
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(child)) != cache.manifest["tokenizer_fingerprint"]
    check_training_inputs(str(child), cache)


def test_an_old_set_whose_model_is_gone_cannot_be_compared(tmp_path, sft):
    child = model_copy(tmp_path, "chat_child", parent=sft)
    tokenizer = AutoTokenizer.from_pretrained(child)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(child)
    cache = score_set(rollout_set(tmp_path, sft, record_vocabulary=False))
    shutil.rmtree(sft)
    refused(child, cache, "records no vocabulary", "make that model available")
