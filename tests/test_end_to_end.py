"""rollout -> score -> train on the real engines (vLLM, Zarr v3, DeepSpeed), checked against transformers."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lopd.cache import open_cache
from lopd.losses import get_loss
from lopd.losses.student import StudentRequest
from lopd.rollout import SamplingConfig, rollout
from lopd.score import ScoreConfig, score
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR, words
from lopd.train.data import SequenceDataset, collate
from lopd.train.trainer import TrainConfig, train

pytestmark = pytest.mark.slow
TEACHER, STUDENT = str(TEACHER_DIR), str(STUDENT_BASE_DIR)


@pytest.fixture(scope="module")
def rollouts(pool, root):
    prompts = [asdict(p) for p in words.make_prompts("test", 24)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=0)
    rollout_set, reused = rollout(TEACHER, prompts, sampling, root=root, verifier="lopd.toy.words:verify",
                                  llm=pool.get(TEACHER), quiet=True)
    assert not reused
    return rollout_set


@pytest.fixture(scope="module")
def teacher_cache(pool, root, rollouts):
    result = score(TEACHER, rollouts, ScoreConfig(k=8, logprob_dtype="float32", rows_per_shard=16), root=root,
                   llm=pool.get(TEACHER), quiet=True)
    return open_cache(result.path)


def full_logprobs(model, seq) -> torch.Tensor:
    """Independent reference: one transformers forward pass over prompt + response, float32."""
    ids = torch.tensor(np.concatenate([seq.prompt_ids, seq.response_ids]))[None]
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(seq.prompt_ids) - 1
    return logp[start : start + len(seq.response_ids)]


def test_rollout_set_records_everything(rollouts):
    assert len(rollouts) == 48
    table = rollouts.table
    for column in ("prompt_id", "group_id", "sample_index", "prompt_ids", "response_ids", "behaviour_logprobs",
                   "finish_reason", "reward"):
        assert column in table.column_names
    assert sorted(set(rollouts.group_ids)) == list(range(24))
    assert set(table.column("sample_index").to_pylist()) == {0, 1}
    for ids, lps in zip(rollouts.response_ids, rollouts.behaviour_logprobs):
        assert len(ids) == len(lps) > 0
    assert rollouts.rewards.mean() > 0.8  # the teacher completes most prefixes into words
    assert rollouts.meta["model_fingerprint"] and rollouts.meta["tokenizer_fingerprint"]


def test_behaviour_logprobs_match_transformers(rollouts, teacher_cache):
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    for i in range(0, len(rollouts), 5):
        seq = teacher_cache[i]
        ref = full_logprobs(model, seq).gather(-1, torch.tensor(seq.response_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(seq.behaviour_logprobs, ref.numpy(), atol=1e-3)


def test_cached_teacher_logprobs_match_transformers(teacher_cache):
    """The cache equals an independent transformers forward pass for the sampled token and the top-k."""
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    assert len(teacher_cache) == 48
    for i in range(len(teacher_cache)):
        seq = teacher_cache[i]
        ref = full_logprobs(model, seq)
        sampled = ref.gather(-1, torch.tensor(seq.response_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(seq.teacher_logprobs, sampled.numpy(), atol=1e-3)
        topk = torch.tensor(seq.topk_ids.astype(np.int64))
        np.testing.assert_allclose(seq.topk_logprobs, ref.gather(-1, topk).numpy(), atol=1e-3)
        np.testing.assert_allclose(seq.topk_logprobs, ref.topk(8, dim=-1).values.numpy(), atol=1e-3)
        # The tail mass 1 - sum(top-k) is compared as a mass: its log is ill-conditioned when the mass is tiny
        # (float32 rounding of the top-k alone moves log(2e-5) by ~1e-2).
        tail = 1.0 - np.exp(ref.topk(8, dim=-1).values.double().numpy()).sum(-1)
        np.testing.assert_allclose(seq.tail_mass, tail, atol=1e-5)


def test_float16_cache_within_1e2_nats(pool, root, rollouts, teacher_cache):
    result = score(TEACHER, rollouts, ScoreConfig(k=8, logprob_dtype="float16"), root=root, llm=pool.get(TEACHER),
                   quiet=True)
    half = open_cache(result.path)
    assert half.id != teacher_cache.id
    for i in range(len(half)):
        a, b = half[i], teacher_cache[i]
        assert np.abs(a.teacher_logprobs.astype(np.float32) - b.teacher_logprobs).max() <= 1e-2
        assert np.abs(a.topk_logprobs.astype(np.float32) - b.topk_logprobs).max() <= 1e-2


def test_rescoring_is_a_cache_hit(pool, root, rollouts, teacher_cache):
    again = score(TEACHER, rollouts, ScoreConfig(k=8, logprob_dtype="float32", rows_per_shard=16), root=root,
                  llm=pool.get(TEACHER), quiet=True)
    assert again.reused and again.teacher_seconds == 0.0 and again.id == teacher_cache.id


def lightning_advantages(model_dir: str, cache) -> tuple[torch.Tensor, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = collate([SequenceDataset(cache)[i] for i in range(len(cache))], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        inputs = batch.loss_inputs_from_logits(logits, StudentRequest())
    student = inputs.student.token_logprobs()
    return (inputs.teacher_logprobs - student) * inputs.mask, inputs.mask


def test_lightning_advantage_is_zero_when_teacher_is_student(pool, root, rollouts):
    """Scoring the teacher's own rollouts with the teacher: every per-token advantage is (numerically) zero."""
    result = score(TEACHER, rollouts, ScoreConfig(k=8, logprob_dtype="float32", rows_per_shard=16), root=root,
                   llm=pool.get(TEACHER), quiet=True)
    advantage, _ = lightning_advantages(TEACHER, open_cache(result.path))
    assert advantage.abs().max() < 1e-3


@pytest.fixture(scope="module")
def student_cache(pool, root):
    """The OPD setting proper: the student base's own rollouts, scored by the teacher."""
    prompts = [asdict(p) for p in words.make_prompts("test", 24)]
    rollout_set, _ = rollout(STUDENT, prompts, SamplingConfig(n=2, max_tokens=10, seed=0), root=root,
                             llm=pool.get(STUDENT), quiet=True)
    result = score(TEACHER, rollout_set, ScoreConfig(k=8, logprob_dtype="float32"), root=root, llm=pool.get(TEACHER),
                   quiet=True)
    return open_cache(result.path)


def test_deepspeed_step_raises_teacher_preferred_tokens(student_cache, tmp_path):
    """One DeepSpeed step of `lightning` on the student's own rollouts raises the tokens the teacher prefers."""
    before, mask = lightning_advantages(STUDENT, student_cache)
    config = TrainConfig(loss="lightning", lr=3e-3, batch_size=48, steps=1, zero_stage=2, seed=0)
    result = train(STUDENT, student_cache, config, tmp_path / "ckpt", quiet=True)
    after, _ = lightning_advantages(str(result.checkpoint), student_cache)
    # advantage = teacher - student, so a drop in advantage is a rise in student log-prob.
    gain = (before - after)[mask > 0]
    preferred = before[mask > 0] > 0
    assert preferred.any() and (~preferred).any()
    assert gain[preferred].mean() > 0
    assert gain[preferred].mean() > gain[~preferred].mean()
    assert (result.checkpoint / "lopd_lineage.json").is_file()
    (row,) = [json.loads(line) for line in (result.checkpoint / "metrics.jsonl").read_text().splitlines()]
    assert row["teacher_kl"] > 0 and row["advantage_var"] > 0 and row["grad_norm"] > 0  # what the lightning study reads
    assert get_loss("lightning").name == "lightning"


def test_privileged_context_scores_the_same_positions(pool, root, rollouts, teacher_cache):
    """A self-teacher that sees the reference answer first: same rows and positions, other numbers, other key."""
    config = ScoreConfig(k=8, logprob_dtype="float32", rows_per_shard=16, context="{answer}|")
    privileged = open_cache(score(TEACHER, rollouts, config, root=root, llm=pool.get(TEACHER), quiet=True).path)
    assert privileged.id != teacher_cache.id
    assert privileged.manifest["config"]["context"] == "{answer}|"
    assert len(privileged) == len(teacher_cache)
    differs = 0
    for i in range(len(privileged)):
        a, b = privileged[i], teacher_cache[i]
        assert np.array_equal(a.response_ids, b.response_ids)
        assert a.teacher_logprobs.shape == b.teacher_logprobs.shape == (len(a.response_ids),)
        differs += int(np.abs(a.teacher_logprobs - b.teacher_logprobs).max() > 1e-3)
    assert differs > len(privileged) // 2
    # Independent check: a transformers pass over <bos> + answer + "|" + prompt (without its <bos>) + response.
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(TEACHER)
    answers = rollouts.table.column("answer").to_pylist()
    for i in range(0, len(privileged), 7):
        seq = privileged[i]
        context = tok(answers[i] + "|", add_special_tokens=False)["input_ids"]
        prompt = np.concatenate([seq.prompt_ids[:1], context, seq.prompt_ids[1:]])
        spliced = type(seq)(**{**seq.__dict__, "prompt_ids": prompt})
        ref = full_logprobs(model, spliced).gather(-1, torch.tensor(seq.response_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(seq.teacher_logprobs, ref.numpy(), atol=1e-3)


def test_correct_and_incorrect_hint_score_sets_and_a_short_context_slice(pool, root, rollouts, teacher_cache):
    """RLCSD's pair (presets `answer` / `wrong_answer`, one template) and OPSDL's slice: own keys, same positions,
    and the slice's numbers equal a transformers pass over <bos> + the prompt's last token + the response."""
    def scored(**context):
        config = ScoreConfig(k=8, logprob_dtype="float32", rows_per_shard=16, **context)
        return open_cache(score(TEACHER, rollouts, config, root=root, llm=pool.get(TEACHER), quiet=True).path)

    correct, wrong, sliced = scored(context="answer"), scored(context="wrong_answer"), scored(context_slice=1)
    assert correct.manifest["config"]["context"] == "answer: {answer}. "
    assert len({correct.id, wrong.id, sliced.id, teacher_cache.id}) == 4
    assert sliced.manifest["config"]["context_slice"] == 1
    contrast = [np.abs(correct[i].teacher_logprobs - wrong[i].teacher_logprobs).max() for i in range(len(correct))]
    assert np.mean(np.array(contrast) > 1e-3) > 0.5
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    for i in range(0, len(sliced), 7):
        seq = sliced[i]
        assert np.array_equal(seq.response_ids, teacher_cache[i].response_ids)
        short = type(seq)(**{**seq.__dict__, "prompt_ids": np.concatenate([seq.prompt_ids[:1], seq.prompt_ids[-1:]])})
        ref = full_logprobs(model, short).gather(-1, torch.tensor(seq.response_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(seq.teacher_logprobs, ref.numpy(), atol=1e-3)
