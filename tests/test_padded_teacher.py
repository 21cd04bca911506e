"""A teacher whose embedding is padded past the shared tokenizer (issue 15 item 1) scores a cache a student trains on.

Qwen3 pads 151,669 tokens to 151,936 and same-family teachers often pad further. Before: the padded ids passed
the vocabulary guard, scoring cached top-k ids >= the student's vocabulary, and `lopd train` crashed at step 1
with `index 70 is out of bounds`. Now the top-k holds the k best ids the tokenizer defines and the padded ids'
mass stays in the tail. One engine (the padded teacher) starts here; the rollouts are written by hand.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopd.cache import open_cache
from lopd.errors import LopdError
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint, vocabulary_fingerprint
from lopd.models.guards import check_training_inputs
from lopd.rollout_set import write_rollout_set
from lopd.score import PADDED_MARGIN, ScoreConfig, best_defined, score
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR
from lopd.train.trainer import TrainConfig, train

pytestmark = pytest.mark.slow
DEFINED, PADDED, K = 64, 16, 8


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory):
    """The toy teacher with 16 padded embedding rows: twice the rows of frequent letters, so padded ids outrank
    real ones and fill the top-k (at some positions more than PADDED_MARGIN of them)."""
    path = tmp_path_factory.mktemp("padded") / "teacher"
    model = AutoModelForCausalLM.from_pretrained(TEACHER_DIR, dtype=torch.float32)
    model.resize_token_embeddings(DEFINED + PADDED, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[DEFINED:] = 2 * weight[4:4 + PADDED]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TEACHER_DIR).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == DEFINED + PADDED
    return str(path)


@pytest.fixture()
def rollouts(tmp_path):
    """Toy-student rollouts written by hand: word prefixes and completions as the character tokenizer spells them."""
    tokenizer = AutoTokenizer.from_pretrained(STUDENT_BASE_DIR)
    records = []
    for i, (prompt, answer) in enumerate([("ab=", "abbey"), ("qu=", "quick"), ("st=", "stone"), ("m=", "maple")]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        records.append({"prompt_id": f"p{i}", "group_id": i, "sample_index": 0, "prompt": prompt, "answer": answer,
                        "prompt_ids": prompt_ids, "response_ids": response_ids,
                        "behaviour_logprobs": [-1.0] * len(response_ids), "finish_reason": "stop", "reward": 1.0})
    model = str(STUDENT_BASE_DIR)
    meta = {"id": "r-padded", "model": model, "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_fingerprint": vocabulary_fingerprint(tokenizer)}
    return write_rollout_set(tmp_path / "rollouts" / "r-padded", records, meta)


def test_best_defined_keeps_rank_order_and_skips_padded_ids():
    ids = np.array([[70, 3, 65, 9, 1], [2, 4, 6, 8, 10]])
    lps = -np.arange(5, dtype=np.float32)[None].repeat(2, 0)
    kept_ids, kept_lps = best_defined(ids, lps, 3, 64)
    assert kept_ids.tolist() == [[3, 9, 1], [2, 4, 6]]
    assert kept_lps.tolist() == [[-1, -3, -4], [0, -1, -2]]


def test_padded_teacher_scores_a_cache_the_student_trains_on(padded_teacher, rollouts, pool, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(padded_teacher, dtype=torch.float32)
    responses = []  # the teacher's full log-distribution at each response position, per row
    for prompt_ids, response_ids in zip(rollouts.prompt_ids, rollouts.response_ids):
        seq = torch.tensor(np.concatenate([prompt_ids, response_ids]))[None]
        with torch.no_grad():
            full = teacher(seq).logits[0].float().log_softmax(-1)
        responses.append(full[len(prompt_ids) - 1: seq.shape[1] - 1])
    padded_in_top = torch.cat([(r.topk(K + PADDED_MARGIN).indices >= DEFINED).sum(-1) for r in responses])
    assert (padded_in_top > 0).any()  # the padded rows rank in the full top-k (where the old scorer kept them)
    assert (padded_in_top > PADDED_MARGIN).any()  # and some rows need the exact second request

    result = score(padded_teacher, rollouts, ScoreConfig(k=K, logprob_dtype="float32"), root=tmp_path,
                   llm=pool.get(padded_teacher), quiet=True)
    cache = open_cache(result.path)
    assert cache.manifest["config"]["topk_ids_below"] == DEFINED
    for i, response in enumerate(responses):
        row, expected = cache[i], response[:, :DEFINED].topk(K)
        np.testing.assert_array_equal(row.topk_ids, expected.indices.numpy())
        np.testing.assert_allclose(row.topk_logprobs, expected.values.numpy(), atol=1e-4)
        padded_mass = response[:, DEFINED:].exp().sum(-1).numpy()
        assert np.all(row.tail_mass >= padded_mass - 1e-5)  # the padded ids' mass is in the tail

    config = TrainConfig(loss="rkl_topk", lr=1e-3, batch_size=4, steps=2, log_every=1, seed=0)
    trained = train(str(STUDENT_BASE_DIR), cache, config, tmp_path / "ckpt", quiet=True, root=tmp_path)
    assert trained.steps == 2 and np.isfinite(trained.final_metrics["loss"])


def test_a_cache_holding_padded_ids_is_refused_before_training(rollouts, tmp_path):
    """A score set made before the fix (top-k ids up to the teacher's padded size) is a one-line error naming the
    fix, where training used to crash at step 1 with an index error."""
    from lopd.cache.score_set import ScoreSetWriter

    header = {"id": "s-old", "kind": "score_set", "teacher": {"model": "t", "fingerprint": "t"},
              "vocab_size": DEFINED + PADDED, "tokenizer_fingerprint": rollouts.meta["tokenizer_fingerprint"],
              "rollout_set": {"id": rollouts.id, "content_digest": rollouts.meta["content_digest"],
                              "path": "../../rollouts/r-padded"},
              "config": {"k": 2, "logprob_dtype": "float16"}, "num_rows": 4}
    writer = ScoreSetWriter(tmp_path / "scores" / "s-old", header, rows_per_shard=4)
    lengths = [len(r) for r in rollouts.response_ids]
    n = sum(lengths)
    plan = writer.plan(4)[0]
    with writer.claim(plan):
        writer.commit(plan, {"offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                             "sampled_logprob": np.full(n, -1.0, np.float16),
                             "topk_ids": np.tile(np.array([70, 5], np.uint8), (n, 1)),
                             "topk_logprobs": np.tile(np.array([-0.5, -2.0], np.float16), (n, 1)),
                             "tail_logprob": np.full(n, -3.0, np.float16)})
    assert writer.finish(4)["complete"]
    with pytest.raises(LopdError, match="may hold top-k ids up to 79"):
        check_training_inputs(str(STUDENT_BASE_DIR), open_cache(tmp_path / "scores" / "s-old"))


def test_online_opd_scores_a_padded_teacher_within_the_defined_ids(padded_teacher, rollouts):
    """The online baseline's live teacher keeps the same rule: before, its top-k held padded ids too."""
    from lopd.rollout import SamplingConfig
    from lopd.train.online import OnlineSampler

    sampler = OnlineSampler(padded_teacher, [], SamplingConfig(max_tokens=4), k=K, micro_batch_size=4,
                            eos_id=2, pad_id=0, seed=0)
    items = [{"prompt_ids": rollouts.prompt_ids[i], "response_ids": rollouts.response_ids[i],
              "behaviour_logprobs": rollouts.behaviour_logprobs[i], "reward": float("nan"), "group_id": 0}
             for i in range(4)]
    for item in sampler.score(items):
        assert item["topk_ids"].max() < DEFINED and item["topk_ids"].shape == (len(item["response_ids"]), K)
