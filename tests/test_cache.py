"""The score-set format and its guarantees, without an engine: round trip, checksums, ids, resume protocol."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from lopd.cache import open_cache
from lopd.cache.admin import entries, verify
from lopd.cache.layout import id_dtype, read_shard, shard_checksum, write_shard
from lopd.cache.score_set import ScoreSetWriter
from lopd.errors import LopdError
from lopd.fingerprint import digest_json, model_fingerprint, tokenizer_fingerprint
from lopd.rollout_set import write_rollout_set
from lopd.score import ScoreConfig, score_set_identity
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR


def synthetic_rows(n: int, rng) -> list[dict]:
    rows = []
    for i in range(n):
        length = int(rng.integers(1, 6))
        rows.append({"prompt_id": f"p{i}", "group_id": i // 2, "sample_index": i % 2, "prompt": "ab=", "answer": "c",
                     "prompt_ids": [1, 4, 5, 40], "response_ids": rng.integers(4, 30, length).tolist(),
                     "behaviour_logprobs": (-rng.random(length)).tolist(), "finish_reason": "stop", "reward": 1.0})
    return rows


@pytest.fixture()
def rollout_set(tmp_path):
    rows = synthetic_rows(10, np.random.default_rng(0))
    model = str(STUDENT_BASE_DIR)
    meta = {"id": "r-synthetic", "model": model, "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(model))}
    return write_rollout_set(tmp_path / "rollouts" / "r-synthetic", rows, meta)


def synthetic_shard(rollouts, start: int, stop: int, k: int, rng) -> dict[str, np.ndarray]:
    lengths = [len(rollouts.response_ids[i]) for i in range(start, stop)]
    n = sum(lengths)
    logits = rng.normal(size=(n, 64))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logp, axis=-1)[:, :k]
    top = np.take_along_axis(logp, order, -1)
    return {"offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "sampled_logprob": logp[:, 5].astype(np.float16), "topk_ids": order.astype(np.uint8),
            "topk_logprobs": top.astype(np.float16),
            "tail_logprob": np.log1p(-np.exp(top).sum(-1)).astype(np.float16)}


@pytest.fixture()
def score_set(tmp_path, rollout_set):
    """A complete 3-shard score set written through the real writer protocol (synthetic numbers)."""
    rng = np.random.default_rng(1)
    path = tmp_path / "scores" / "s-synthetic"
    header = {"id": "s-synthetic", "kind": "score_set", "teacher": {"model": "t", "fingerprint": "f"},
              "rollout_set": {"id": rollout_set.id, "content_digest": rollout_set.meta["content_digest"],
                              "path": "../../rollouts/r-synthetic"},
              "config": {"k": 4, "logprob_dtype": "float16"}, "num_rows": 10}
    writer = ScoreSetWriter(path, header, rows_per_shard=4)
    for plan in writer.plan(10):
        with writer.claim(plan) as mine:
            assert mine
            writer.commit(plan, synthetic_shard(rollout_set, plan.start, plan.stop, 4, rng))
    assert writer.finish(10)["complete"]
    return path


def test_shard_round_trip_and_checksum(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"offsets": np.array([0, 3, 7], np.int64), "sampled_logprob": (-rng.random(7) * 20).astype(np.float16),
              "topk_ids": rng.integers(0, 65535, (7, 32)).astype(np.uint16),
              "topk_logprobs": (-rng.random((7, 32)) * 20).astype(np.float16),
              "tail_logprob": (-rng.random(7)).astype(np.float16)}
    write_shard(tmp_path / "s", arrays)
    back = read_shard(tmp_path / "s")
    for name, value in arrays.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].dtype == value.dtype
    assert shard_checksum(tmp_path / "s") == shard_checksum(tmp_path / "s")


def test_ids_packed_to_vocabulary_width():
    assert id_dtype(64) == np.uint8 and id_dtype(256) == np.uint8
    assert id_dtype(257) == np.uint16 and id_dtype(65536) == np.uint16
    assert id_dtype(151_936) == np.uint32


def test_float16_round_trip_error_within_bound():
    values = -np.random.default_rng(0).random(100_000) * 30
    assert np.abs(values.astype(np.float16).astype(np.float64) - values).max() <= 1e-2


def test_reader_joins_rollouts_and_shards(score_set, rollout_set):
    cache = open_cache(score_set)
    assert len(cache) == 10
    for i in range(10):
        seq = cache[i]
        assert np.array_equal(seq.response_ids, rollout_set.response_ids[i])
        assert seq.teacher_logprobs.shape == (len(seq.response_ids),)
        assert seq.topk_ids.shape == seq.topk_logprobs.shape == (len(seq.response_ids), 4)
        assert np.all(np.diff(seq.topk_logprobs.astype(np.float32), axis=-1) <= 0)


def flip_one_byte(shard_dir):
    chunk = max((p for p in shard_dir.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def test_verify_names_a_flipped_byte_and_training_refuses_it(score_set):
    assert verify(score_set) == []
    flip_one_byte(score_set / "shards" / "00001")
    problems = verify(score_set)
    assert problems == ["shard 00001: checksum mismatch (truncated or modified)"]
    cache = open_cache(score_set)
    cache[0]  # shard 00000 is intact
    with pytest.raises(LopdError, match="shard 00001 is corrupt"):
        cache[5]


def test_verify_names_a_truncated_and_a_missing_shard(score_set):
    chunk = next(p for p in (score_set / "shards" / "00002").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-5])
    shutil.rmtree(score_set / "shards" / "00000")
    assert verify(score_set) == ["shard 00000: missing", "shard 00002: checksum mismatch (truncated or modified)"]


def test_incomplete_set_is_refused_and_resumed(tmp_path, rollout_set):
    """A writer killed after one shard leaves a resumable set; the next writer does only what is missing."""
    rng = np.random.default_rng(2)
    path = tmp_path / "scores" / "s-partial"
    header = {"id": "s-partial", "rollout_set": {"path": "../../rollouts/r-synthetic"}, "num_rows": 10}
    first = ScoreSetWriter(path, header, rows_per_shard=4)
    plan = first.plan(10)[0]
    with first.claim(plan):
        first.commit(plan, synthetic_shard(rollout_set, plan.start, plan.stop, 4, rng))
    (path / "shards" / "00001").mkdir(parents=True)  # a crash leftover: renamed but never recorded
    assert not first.finish(10)["complete"]
    with pytest.raises(LopdError, match="incomplete"):
        open_cache(path)
    second = ScoreSetWriter(path, header, rows_per_shard=999)  # rows_per_shard comes from the manifest
    assert [p.name for p in second.pending(second.plan(10))] == ["00001", "00002"]
    for plan in second.pending(second.plan(10)):
        with second.claim(plan) as mine:
            assert mine and not (path / "shards" / plan.name).exists()
            second.commit(plan, synthetic_shard(rollout_set, plan.start, plan.stop, 4, rng))
    assert second.finish(10)["complete"]
    assert len(open_cache(path)) == 10


def test_claimed_shard_is_skipped_by_a_second_writer(tmp_path, rollout_set):
    path = tmp_path / "scores" / "s-two"
    header = {"id": "s-two", "num_rows": 10}
    a, b = ScoreSetWriter(path, header, 4), ScoreSetWriter(path, header, 4)
    plan = a.plan(10)[0]
    with a.claim(plan) as mine_a, b.claim(plan) as mine_b:
        assert mine_a and not mine_b


def test_different_cache_in_output_path_is_refused(tmp_path):
    ScoreSetWriter(tmp_path / "x", {"id": "s-one"}, 4)
    with pytest.raises(LopdError, match="already holds a different score set"):
        ScoreSetWriter(tmp_path / "x", {"id": "s-two"}, 4)


def test_cache_key_changes_with_every_input(tmp_path, rollout_set):
    """Same inputs -> same id; weights, tokenizer, k, dtype or rollouts changed -> a different id."""
    tok = AutoTokenizer.from_pretrained(TEACHER_DIR)
    base = ScoreConfig(k=8)
    key = lambda teacher, tokenizer, rollouts, config: digest_json(  # noqa: E731
        score_set_identity(teacher, tokenizer, rollouts, config))
    reference = key(str(TEACHER_DIR), tok, rollout_set, base)
    assert key(str(TEACHER_DIR), tok, rollout_set, base) == reference
    moved = tmp_path / "teacher_copy"
    shutil.copytree(TEACHER_DIR, moved)
    assert key(str(moved), tok, rollout_set, base) == reference  # content, not location
    weights = moved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert key(str(moved), tok, rollout_set, base) != reference
    templated = AutoTokenizer.from_pretrained(TEACHER_DIR)
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert key(str(TEACHER_DIR), templated, rollout_set, base) != reference
    assert key(str(TEACHER_DIR), tok, rollout_set, ScoreConfig(k=16)) != reference
    assert key(str(TEACHER_DIR), tok, rollout_set, ScoreConfig(k=8, logprob_dtype="float32")) != reference
    other_rows = write_rollout_set(tmp_path / "rollouts" / "r-other", synthetic_rows(10, np.random.default_rng(9)),
                                   dict(rollout_set.meta, id="r-other"))
    assert key(str(TEACHER_DIR), tok, other_rows, base) != reference


def test_cache_ls_reports_size_and_bytes_per_position(score_set, tmp_path):
    [entry] = entries(tmp_path)
    assert entry["id"] == "s-synthetic" and entry["complete"] and entry["positions"] > 0
    assert entry["bytes_per_position"] == round(entry["bytes"] / entry["positions"], 1)
    assert json.loads((score_set / "manifest.json").read_text())["format_version"] == 1
