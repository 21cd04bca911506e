"""The score-set format and its guarantees, without an engine: round trip, checksums, ids, resume protocol."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from lopd.cache import open_cache
from lopd.cache.admin import entries, verify
from lopd.cache.layout import encode_ids, id_dtype, read_shard, read_stored, shard_bytes, shard_checksum, write_shard
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


# ---- the compact shard encoding (lopd.cache.layout; measured in tools/bench_cache.py) ----------------------------

def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_cache.py"
    spec = importlib.util.spec_from_file_location("bench_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize]) if a.dtype.kind == "f" else a


@pytest.mark.parametrize("vocab", [64, 65_536, 151_936])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_encoded_shard_round_trips_bit_exactly(tmp_path, vocab, dtype):
    """Ids, top-k, sampled and tail log-probs come back with identical bits and dtypes, sorted or not,
    including +0/-0, the -1e4 floor, -inf and NaN, and sampled values inside and outside the top-k."""
    rng = np.random.default_rng(vocab)
    n, k = 3000, 32
    top = -np.sort(rng.exponential(3.0, (n, k)), axis=1)
    top[::7] = rng.permutation(top[::7].T).T  # unsorted rows too
    top[1, 0], top[2, 0], top[3, -1], top[4, -1], top[5, 3] = 0.0, -0.0, -1e4, -np.inf, np.nan
    top = top.astype(dtype)
    sampled = np.where(rng.random(n) < 0.8, top[np.arange(n), rng.integers(0, k, n)], -rng.exponential(20, n)).astype(dtype)
    sampled[10], sampled[11] = -0.0, np.nan
    top[10, 5] = 0.0  # +0 in the row must not stand in for a sampled -0
    arrays = {"offsets": np.array([0, 1000, 1000, n], np.int64), "sampled_logprob": sampled,
              "topk_ids": np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(id_dtype(vocab)),
              "topk_logprobs": top, "tail_logprob": (-rng.exponential(5, n)).astype(dtype)}
    write_shard(tmp_path / "s", arrays)
    stored = read_stored(tmp_path / "s")
    assert "topk_ids" not in stored and "topk_logprobs" not in stored and "sampled_logprob" not in stored
    back = read_shard(tmp_path / "s")
    assert sorted(back) == sorted(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        np.testing.assert_array_equal(_bits(back[name]), _bits(value), err_msg=name)


def test_empty_shard_and_plain_layout_round_trip(tmp_path):
    empty = {"offsets": np.zeros(1, np.int64), "sampled_logprob": np.zeros(0, np.float16),
             "topk_ids": np.zeros((0, 8), np.uint32), "topk_logprobs": np.zeros((0, 8), np.float16),
             "tail_logprob": np.zeros(0, np.float16)}
    write_shard(tmp_path / "empty", empty)
    back = read_shard(tmp_path / "empty")
    for name, value in empty.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
    rng = np.random.default_rng(3)
    plain = {"offsets": np.array([0, 5], np.int64), "sampled_logprob": (-rng.random(5)).astype(np.float16),
             "topk_ids": rng.integers(0, 1000, (5, 4)).astype(np.uint16),
             "topk_logprobs": (-rng.random((5, 4))).astype(np.float16), "tail_logprob": (-rng.random(5)).astype(np.float16)}
    write_shard(tmp_path / "plain", plain, encode=False)  # the logical arrays stored as-is: still readable
    assert "topk_ids" in read_stored(tmp_path / "plain")
    back = read_shard(tmp_path / "plain")
    for name, value in plain.items():
        np.testing.assert_array_equal(back[name], value)


def test_id_codes_follow_frequency():
    ids = np.array([[7, 3, 9], [3, 7, 100_000], [3, 9, 7]], np.uint32)
    codes, table = encode_ids(ids)
    assert codes.dtype == np.uint8 and table.dtype == np.uint32
    assert table.tolist() == [3, 7, 9, 100_000]  # by descending count, ties by id
    np.testing.assert_array_equal(table[codes], ids)


def test_bytes_per_position_and_error_at_k32(tmp_path):
    """Realistic synthetic teacher signal (tools/bench_cache.py generator), k=32: <= 100 bytes per position on
    151,936- and 65,536-token vocabularies; float16 error <= 1e-2 nats for every log-prob >= -32."""
    bench = _load_bench()
    for seed, vocab in enumerate((151_936, 65_536)):
        truth = bench.make_truth(seed, 96, vocab)
        arrays = bench.logical_arrays(truth, "zipf", "float16")
        positions = len(arrays["sampled_logprob"])
        write_shard(tmp_path / str(vocab), arrays)
        assert shard_bytes(tmp_path / str(vocab)) / positions <= 100
        back = read_shard(tmp_path / str(vocab))
        np.testing.assert_array_equal(back["topk_ids"].astype(np.int64), truth["ids"]["zipf"])
        for name, ref in (("topk_logprobs", truth["top"]), ("sampled_logprob", truth["sampled"]),
                          ("tail_logprob", truth["tail"])):
            err = np.abs(back[name].astype(np.float64) - ref)
            assert err[ref >= -32].max() <= 1e-2, name
            assert (err <= np.abs(ref) * 2.0 ** -11 + 1e-7).all(), name  # float16 rounding, relative


def test_teacher_consistency_guard(score_set, tmp_path):
    """OPD from a cache scored by a teacher other than the one that wrote the student's SFT data is refused."""
    from lopd.models.lineage import write_lineage
    from lopd.train.trainer import check_teacher_consistency, teacher_consistency

    cache = open_cache(score_set)  # scored by teacher fingerprint "f"
    student = tmp_path / "student"
    shutil.copytree(STUDENT_BASE_DIR, student)
    check_teacher_consistency(str(student), cache, allow=False)  # no recorded SFT data model: nothing to check
    write_lineage(student, {"sft_data_model": "f"})
    check_teacher_consistency(str(student), cache, allow=False)  # same teacher: fine
    write_lineage(student, {"sft_data_model": "another-teacher"})
    with pytest.raises(LopdError, match="teacher consistency .*--allow-teacher-mismatch"):
        check_teacher_consistency(str(student), cache, allow=False)
    check_teacher_consistency(str(student), cache, allow=True)
    assert teacher_consistency(str(student), cache, allow=True) == {
        "sft_data_model": "another-teacher", "scored_by": "f", "consistent": False, "override": True}


def test_gc_removes_only_unreferenced_entries(score_set, rollout_set, tmp_path):
    from lopd.cache.admin import collect
    from lopd.cost.ledger import append_row

    assert sorted(p.name for p in collect(tmp_path, dry_run=True)) == ["r-synthetic", "s-synthetic"]
    assert score_set.is_dir()  # a dry run removes nothing
    append_row(tmp_path, {"experiment": "exp-a", "stage": "train", "method": "rkl_topk", "artifact": "ckpt",
                          "inputs": ["s-synthetic"], "wall_seconds": 1.0, "device_kind": "cpu", "device_count": 1})
    assert collect(tmp_path, dry_run=True) == []  # the score set is used; its rollout set is needed by it
    (tmp_path / "rollouts" / "r-orphan").mkdir()
    (tmp_path / "rollouts" / "r-orphan" / "meta.json").write_text(json.dumps({"id": "r-orphan"}))
    assert [p.name for p in collect(tmp_path, dry_run=False)] == ["r-orphan"]
    assert not (tmp_path / "rollouts" / "r-orphan").exists() and score_set.is_dir()


@pytest.fixture()
def many_shards(tmp_path):
    """A complete 20-shard score set (2 rows per shard) over 40 synthetic rollouts."""
    rng = np.random.default_rng(3)
    model = str(STUDENT_BASE_DIR)
    meta = {"id": "r-many", "model": model, "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(model))}
    rollouts = write_rollout_set(tmp_path / "rollouts" / "r-many", synthetic_rows(40, rng), meta)
    header = {"id": "s-many", "kind": "score_set", "teacher": {"model": "t", "fingerprint": "f"},
              "rollout_set": {"id": rollouts.id, "content_digest": rollouts.meta["content_digest"],
                              "path": "../../rollouts/r-many"},
              "config": {"k": 4, "logprob_dtype": "float16"}, "num_rows": 40}
    writer = ScoreSetWriter(tmp_path / "scores" / "s-many", header, rows_per_shard=2)
    for plan in writer.plan(40):
        with writer.claim(plan):
            writer.commit(plan, synthetic_shard(rollouts, plan.start, plan.stop, 4, rng))
    assert writer.finish(40)["complete"]
    return tmp_path / "scores" / "s-many"


@pytest.mark.parametrize("limit", [1, 3])
def test_trainer_data_path_keeps_at_most_the_configured_decoded_shards(many_shards, monkeypatch, limit):
    """Before: every shard read stayed decoded for the whole run (20 here); now at most `limit` at any time, and
    the shard-window shuffle decodes each of this rank's shards once per epoch instead of once per row."""
    from lopd.cache import reader
    from lopd.train import distributed
    from lopd.train.data import SequenceDataset
    from lopd.train.trainer import TrainConfig, offline_batches

    config = TrainConfig(loss="rkl_topk", seed=0, max_decoded_shards=limit)
    cache = open_cache(many_shards, max_decoded_shards=config.max_decoded_shards)
    decoded: list[str] = []
    real_read = reader.read_shard_checked
    monkeypatch.setattr(reader, "read_shard_checked",
                        lambda path, checksum: decoded.append(path.name) or real_read(path, checksum))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # this process is rank 1 of 2
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    stream = offline_batches(SequenceDataset(cache), config, micro=4, accumulation=1, pad_id=0)
    rows = []
    for _ in range(5):  # one epoch of this rank's 20 rows
        (batch,) = next(stream)
        rows += batch.rows.tolist()
        assert cache.decoded_shards <= limit
    assert len(rows) == 20 and len(set(rows)) == 20
    assert set(decoded) == {cache.shard_of(r)[0] for r in rows}  # only the shards this rank's rows live in
    assert cache.decodes == len(decoded) == len(set(decoded))
    assert cache[rows[0]].topk_ids.base is None  # rows are copies: holding one does not pin an evicted shard
    with pytest.raises(LopdError, match="--max-decoded-shards must be at least 1"):
        open_cache(many_shards, max_decoded_shards=0)


def test_discarded_damaged_shards_are_pending_again(score_set):
    """The writer's side of repair: damaged committed shards are un-committed, the set marked incomplete, and
    only they are offered to the next writer."""
    from lopd.cache.score_set import damaged_shards

    shutil.rmtree(score_set / "shards" / "00000")
    flip_one_byte(score_set / "shards" / "00002")
    writer = ScoreSetWriter(score_set, {"id": "s-synthetic"}, rows_per_shard=4)
    damaged = damaged_shards(score_set, writer.manifest())
    assert damaged == {"00000": "missing", "00002": "checksum mismatch (truncated or modified)"}
    writer.discard(list(damaged))
    assert not writer.manifest()["complete"]
    assert [p.name for p in writer.pending(writer.plan(10))] == ["00000", "00002"]
    with pytest.raises(LopdError, match="incomplete"):
        open_cache(score_set)


def test_cache_verify_names_the_repair_command(score_set):
    from click.testing import CliRunner

    from lopd.cli import main

    shutil.rmtree(score_set / "shards" / "00001")
    result = CliRunner().invoke(main, ["cache", "verify", str(score_set), "--root", str(score_set.parent.parent)])
    assert result.exit_code == 1
    assert "shard 00001: missing" in result.stdout and f"lopd cache repair {score_set}" in result.stderr


def test_foreign_output_directory_is_refused_before_any_lock(tmp_path):
    """Before: the refusal came after the manifest lock, leaving locks/manifest.lock in the user's directory."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine\n")
    with pytest.raises(LopdError, match="is not empty and holds no score set"):
        ScoreSetWriter(out, {"id": "s-one"}, 4)
    assert [p.name for p in out.iterdir()] == ["todo.txt"]
    leftovers = tmp_path / "crashed"  # what a writer killed before its manifest leaves is not foreign
    (leftovers / "locks").mkdir(parents=True)
    (leftovers / ".manifest.json.0a1b2c").write_text("")
    ScoreSetWriter(leftovers, {"id": "s-one"}, 4)


class Reached(LopdError):
    """Raised by a stand-in for a stage function: the command got that far, with these inputs."""


def stop_at(monkeypatch, module, name: str, describe) -> None:
    def fake(*args, **kwargs):
        raise Reached(f"reached {name} with {describe(*args, **kwargs)}")
    monkeypatch.setattr(module, name, fake)


@pytest.mark.parametrize("command,expected", [
    (["train", "--student", "{student}", "--cache", "s-syn", "--loss", "rkl_topk", "--out", "{out}"],
     "source=s-synthetic"),
    (["train", "--student", "{student}", "--rollouts", "r-syn", "--loss", "sft", "--out", "{out}"],
     "source=r-synthetic"),
    (["train", "--student", "{student}", "--cache", "s-synthetic", "--base", "s-syn", "--contrast", "s-synth",
      "--loss", "rkl_topk", "--out", "{out}"], "attached=base_logprobs:s-synthetic,contrast_logprobs:s-synthetic"),
    (["score", "--teacher", "{teacher}", "--rollouts", "r-syn"], "rollouts=r-synthetic"),
    (["diagnose", "alignment", "--cache", "s-syn", "--student", "{student}"], "cache=s-synthetic"),
])
def test_every_command_takes_an_id_prefix_as_cache_show_does(score_set, tmp_path, monkeypatch, command, expected):
    """Before: `lopd cache show s-syn` found the set but `lopd train --cache s-syn` (and --rollouts, --base,
    --contrast, `lopd score --rollouts`, `lopd diagnose alignment --cache`) wanted the whole id or a path."""
    from click.testing import CliRunner

    import lopd.score
    import lopd.train.alignment
    import lopd.train.trainer
    from lopd.cli import main

    stop_at(monkeypatch, lopd.train.trainer, "train", lambda student, source, *a, attached, **k: (
        f"source={source.id} attached=" + ",".join(f"{f}:{c.id}" for f, c in attached.items())))
    stop_at(monkeypatch, lopd.score, "score", lambda teacher, rollouts, *a, **k: f"rollouts={rollouts.id}")
    stop_at(monkeypatch, lopd.train.alignment, "diagnose_alignment", lambda student, cache, **k: f"cache={cache.id}")
    args = [a.format(student=STUDENT_BASE_DIR, teacher=TEACHER_DIR, out=tmp_path / "ck") for a in command]
    result = CliRunner().invoke(main, [*args, "--root", str(tmp_path)])
    assert result.stderr.startswith("error: reached ") and expected in result.stderr, result.output
    shown = CliRunner().invoke(main, ["cache", "show", "s-syn", "--root", str(tmp_path)])
    assert json.loads(shown.stdout)["id"] == "s-synthetic"


@pytest.mark.parametrize("command", [
    ["cache", "show", "s-syn"],
    ["train", "--student", str(STUDENT_BASE_DIR), "--cache", "s-syn", "--loss", "rkl_topk", "--out", "ck"],
])
def test_an_ambiguous_prefix_is_one_line_listing_the_matches(score_set, tmp_path, command):
    from click.testing import CliRunner

    from lopd.cli import main

    shutil.copytree(score_set, tmp_path / "scores" / "s-synthetic-b")
    result = CliRunner().invoke(main, [*command, "--root", str(tmp_path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "score set id prefix 's-syn' is ambiguous" in lines[0] and "s-synthetic, s-synthetic-b" in lines[0]
    exact = CliRunner().invoke(main, ["cache", "show", "s-synthetic", "--root", str(tmp_path)])
    assert json.loads(exact.stdout)["id"] == "s-synthetic"  # a full id is never ambiguous


def test_shard_worker_says_the_set_is_incomplete(rollout_set, tmp_path, monkeypatch):
    """Before: `lopd score --shard 0/2` exited 0 printing the same JSON as a finished set. Now a line on stderr
    names the shards written and the workers still to run, and the JSON says complete: false. Engine-free: the
    engine and the per-shard scoring are stand-ins; the writer, manifest and report are the real ones."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from click.testing import CliRunner

    import lopd.score
    from lopd.cli import main

    @contextmanager
    def engine(llm, model, **kwargs):
        yield SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_logprobs=64)))

    rng = np.random.default_rng(4)
    monkeypatch.setattr(lopd.score, "running_engine", engine)
    monkeypatch.setattr(lopd.score, "score_rows", lambda engine, rollouts, plan, config, *a, **k: synthetic_shard(
        rollouts, plan.start, plan.stop, config.k, rng))
    base = ["score", "--teacher", str(TEACHER_DIR), "--rollouts", "r-synthetic", "--k", "4", "--rows-per-shard", "4",
            "--root", str(tmp_path)]
    first = CliRunner().invoke(main, [*base, "--shard", "0/2"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["complete"] is False
    assert first.stderr.strip().splitlines()[-1] == (f"shard 0/2 done; 2 of 3 shards written; run the other shards (--shard 1/2) "
                                    f"to complete {report['score_set']}")
    second = CliRunner().invoke(main, [*base, "--shard", "1/2"])
    assert second.exit_code == 0 and json.loads(second.stdout)["complete"] is True and "done;" not in second.stderr
    assert len(open_cache(report["path"])) == 10
