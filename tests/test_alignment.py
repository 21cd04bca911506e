"""`lopd diagnose alignment` and the aligned-token filter (lopd.train.alignment), checked against explicit autograd.

The fast tests build a small score set without an engine: toy-student rollouts with hand-set rewards, scored by
the toy teacher through transformers. The slow test runs the real pipeline (vLLM rollout and score).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lopd.cache import open_cache
from lopd.errors import LopdError
from lopd.losses import get_loss
from lopd.losses.base import LossInputs
from lopd.losses.student import StudentLogprobs
from lopd.train.alignment import (
    AlignedTokenFilter,
    aligned_mask,
    check_token_filter,
    outcome_loss,
    row_advantages,
    signal_of,
    token_alignment,
)
from toy_sets import STUDENT, TEACHER, make_rollout_set, make_score_set, rollout_records


def signal(name: str, **args):
    spec = get_loss(name)
    return signal_of(spec, spec.resolve_args(args))


def random_inputs(seed: int = 0, B: int = 3, T: int = 5, V: int = 11, K: int = 4) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    teacher = (2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    top = teacher.topk(K, dim=-1)
    return LossInputs(student=StudentLogprobs.from_logits(logits, tokens, mask, top.indices), tokens=tokens, mask=mask,
                      teacher_logprobs=teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                      behaviour_logprobs=logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                      topk_ids=top.indices, topk_logprobs=top.values,
                      rewards=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)[:B],
                      group_ids=torch.zeros(B, dtype=torch.int64))


def reference_alignment(inputs: LossInputs, advantages: torch.Tensor, fn) -> torch.Tensor:
    """Slow: per token, autograd of that token's own term of each objective (the signal with a one-position mask)."""
    B, T = inputs.mask.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if inputs.mask[b, t] == 0:
                continue
            only = torch.zeros_like(inputs.mask)
            only[b, t] = 1
            z = inputs.student.logits.detach().clone().requires_grad_(True)
            student = StudentLogprobs.from_logits(z, inputs.tokens, only, inputs.topk_ids, inputs.student.request)
            (g_sig,) = torch.autograd.grad(fn(replace(inputs, student=student, mask=only)), z)
            z = inputs.student.logits.detach().clone().requires_grad_(True)
            term = -advantages[b] * z[b, t].log_softmax(-1)[inputs.tokens[b, t]]
            (g_out,) = torch.autograd.grad(term, z)
            if g_sig[b, t].norm() > 1e-12 and g_out[b, t].norm() > 1e-12:
                out[b, t] = torch.nn.functional.cosine_similarity(g_sig[b, t], g_out[b, t], dim=0)
            assert g_sig[[i for i in range(B) if i != b]].abs().max() == 0  # token t's term touches only z[b, t]
    return out


@pytest.mark.parametrize("name,args", [("rkl_topk", {}), ("rkl_topk", {"tail": True}), ("lightning", {}), ("sft", {})])
def test_token_alignment_matches_per_token_autograd(name, args):
    inputs = random_inputs()
    advantages = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    fn = signal(name, **args)
    fast = token_alignment(inputs, advantages, fn)
    slow = reference_alignment(inputs, advantages, fn)
    assert torch.equal(torch.isnan(fast), torch.isnan(slow))
    assert torch.isnan(fast[1, 3:]).all() and not torch.isnan(fast[0]).any()
    torch.testing.assert_close(fast.nan_to_num(9.0), slow.nan_to_num(9.0), atol=1e-9, rtol=0)


def test_cosine_is_plus_one_along_the_outcome_gradient_and_minus_one_against_it():
    inputs = random_inputs(1)
    advantages = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    live = inputs.mask > 0
    # A teacher signal that is exactly the outcome objective (scaled) points along its gradient ...
    along = token_alignment(inputs, advantages, lambda i: 3.0 * outcome_loss(i.student.logits, i.tokens, i.mask, advantages))
    torch.testing.assert_close(along[live], torch.ones_like(along[live]), atol=1e-9, rtol=0)
    # ... and one that ascends it, against.
    against = token_alignment(inputs, advantages, lambda i: -outcome_loss(i.student.logits, i.tokens, i.mask, advantages))
    torch.testing.assert_close(against[live], -torch.ones_like(against[live]), atol=1e-9, rtol=0)
    # Registered losses: SFT (imitate every token) agrees with success and opposes failure, token by token.
    sft = token_alignment(inputs, advantages, signal("sft"))
    expected = torch.sign(advantages).unsqueeze(-1).expand_as(sft)
    torch.testing.assert_close(sft[live], expected[live], atol=1e-9, rtol=0)
    # Lightning's per-token signal is parallel to the outcome gradient: cos = sign(D_t) sign(A).
    student = inputs.student.logits.log_softmax(-1).gather(-1, inputs.tokens.unsqueeze(-1)).squeeze(-1)
    lightning = token_alignment(inputs, advantages, signal("lightning"))
    expected = torch.sign(inputs.teacher_logprobs - student) * torch.sign(advantages).unsqueeze(-1)
    torch.testing.assert_close(lightning[live], expected[live], atol=1e-9, rtol=0)


def test_zero_advantage_and_masked_positions_are_undefined():
    inputs = random_inputs(2)
    cos = token_alignment(inputs, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), signal("rkl_topk"))
    assert torch.isnan(cos[0]).all() and torch.isnan(cos[1, 3:]).all()
    assert not torch.isnan(cos[1, :3]).any() and not torch.isnan(cos[2]).any()


def test_filter_keeps_exactly_the_positively_aligned_tokens():
    inputs = random_inputs(3)
    row_adv = np.array([9.0, -0.8, 1.1, 0.0, 0.6])  # dataset rows; the batch holds rows 4, 1, 3
    rows = torch.tensor([4, 1, 3])
    fn = signal("rkl_topk")
    filtered, metrics = AlignedTokenFilter(row_adv, fn)(inputs, rows)
    cos = reference_alignment(inputs, torch.tensor([0.6, -0.8, 0.0], dtype=torch.float64), fn)
    live = inputs.mask > 0
    expected = inputs.mask * ((cos > 0) | (torch.isnan(cos) & live)).double()  # row 3 (A = 0): no verdict, kept
    assert torch.equal(filtered.mask, expected)
    assert 0 < (filtered.mask[:2].sum() / inputs.mask[:2].sum()) < 1  # both verdicts occur on this seed
    assert filtered.mask[2].sum() == inputs.mask[2].sum()
    assert metrics["filter_kept"] == pytest.approx((expected.sum() / inputs.mask.sum()).item())
    assert metrics["filter_defined"] == pytest.approx((inputs.mask[:2].sum() / inputs.mask.sum()).item())
    assert torch.equal(filtered.student.logits, inputs.student.logits) and torch.equal(filtered.tokens, inputs.tokens)
    # aligned_mask alone: cos > 0 kept, cos <= 0 dropped, NaN kept, masked stays masked.
    cos = torch.tensor([[0.5, -0.5, 0.0, float("nan"), 0.2]])
    assert aligned_mask(cos, torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])).tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0]]


# -- a small score set without an engine (tests/toy_sets.py)


REWARDS = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0]]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment-root")
    rollouts = make_rollout_set(root / "rollouts" / "r-align", rollout_records(REWARDS))
    make_score_set(root, rollouts)
    return root


def invoke(*args):
    from lopd.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def assert_one_line_error(result, needle: str) -> None:
    """What the user sees from `lopd` (lopd.cli.Lopd): exit code 2 and one `error:` line naming the problem."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        result.stderr


def test_row_advantages_are_grpo_over_whole_groups(small_root):
    from lopd.rollout_set import RolloutSet

    advantages = row_advantages(RolloutSet.open(small_root / "rollouts" / "r-align"))
    assert advantages[:4] == pytest.approx([1, -1, -1, 1], abs=1e-5)  # rewards 1 0 0 1: mean .5, std .5
    assert (advantages[4:8] == 0).all() and (advantages[12:16] == 0).all()  # all-correct and all-failed groups
    assert advantages[10] == pytest.approx(3 ** 0.5, abs=1e-5) and advantages[8] == pytest.approx(-1 / 3 ** 0.5, abs=1e-5)


def test_diagnose_alignment_writes_json_md_png(small_root, tmp_path):
    out = tmp_path / "report"
    result = invoke("diagnose", "alignment", "--cache", "s-r-align", "--student", STUDENT, "--out", str(out),
                    "--root", str(small_root))
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert summary["report"] == str(out) and summary["signal"] == "rkl_topk"
    report = json.loads((out / "alignment.json").read_text())
    assert report["rows_total"] == 24 and report["rows_zero_advantage"] == 8 and report["rows_sampled"] == 16
    assert report["per_rollout"]["failed"]["count"] == 9 and report["per_rollout"]["successful"]["count"] == 7
    assert summary["per_rollout"]["failed"]["count"] == 9
    tokens = sum(r["tokens"] for r in report["rollouts"])
    assert report["per_token"]["all"]["count"] == tokens
    for r in report["rollouts"]:
        assert -1 <= r["cosine"] <= 1 and (r["advantage"] < 0) == (r["split"] == "failed")
    assert "| failed | 9 |" in (out / "alignment.md").read_text()
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --rows bounds the sample deterministically; the default directory is under the root.
    again = invoke("diagnose", "alignment", "--cache", "s-r-align", "--student", STUDENT, "--rows", "5",
                   "--signal", "lightning", "--root", str(small_root))
    assert again.exit_code == 0, (again.output, again.exception)
    report = json.loads(again.stdout)
    assert report["rows"] == 5 and report["report"].startswith(str(small_root / "diagnostics" / "alignment-s-r-align-"))
    assert (small_root / "diagnostics").is_dir()


def test_sft_signal_is_parallel_to_success_in_parameter_space(small_root, tmp_path):
    """With SFT as the signal, grad = -(1/N) sum grad log pi and the outcome's is -A sum grad log pi: cos = sign(A)."""
    from lopd.train.alignment import diagnose_alignment

    report = diagnose_alignment(STUDENT, open_cache(small_root / "scores" / "s-r-align"), signal="sft",
                                out=tmp_path / "sft", quiet=True)
    rollouts = json.loads((tmp_path / "sft" / "alignment.json").read_text())["rollouts"]
    for r in rollouts:
        assert r["cosine"] == pytest.approx(1.0 if r["split"] == "successful" else -1.0, abs=1e-5)
    assert report["per_token"]["failed"]["fraction_positive"] == 0.0
    assert report["per_token"]["successful"]["fraction_positive"] == 1.0


def test_one_line_errors(tmp_path, small_root):
    root = tmp_path / "root"
    no_rewards = make_rollout_set(root / "rollouts" / "r-none", [dict(r, reward=None) for r in rollout_records(REWARDS[:2])])
    singles = make_rollout_set(root / "rollouts" / "r-single",
                               [dict(r, group_id=i) for i, r in enumerate(rollout_records(REWARDS[:2]))])
    for rollouts, needle in ((no_rewards, "lopd rollout --verifier"), (singles, "--n N")):
        with pytest.raises(LopdError, match=re.escape(needle)):
            row_advantages(rollouts)
        with pytest.raises(LopdError, match=re.escape(needle)):
            check_token_filter("aligned", rollouts)
    cache = make_score_set(root, singles)
    result = invoke("diagnose", "alignment", "--cache", str(cache.path), "--student", STUDENT, "--root", str(root))
    assert_one_line_error(result, "--n N")
    equal = make_score_set(root, make_rollout_set(root / "rollouts" / "r-equal", rollout_records([[1, 1], [0, 0]])))
    result = invoke("diagnose", "alignment", "--cache", str(equal.path), "--student", STUDENT, "--root", str(root))
    assert_one_line_error(result, "equal rewards")
    result = invoke("diagnose", "alignment", "--cache", "s-r-align", "--student", STUDENT, "--signal", "exopd",
                    "--root", str(small_root))
    assert_one_line_error(result, "base_logprobs")
    with pytest.raises(LopdError, match="online"):
        check_token_filter("aligned", None)
    with pytest.raises(LopdError, match="refresh"):
        check_token_filter("aligned", cache, refresh=True)
    with pytest.raises(LopdError, match="unknown token filter"):
        check_token_filter("positive", cache)
    check_token_filter("none", None)


def test_pipeline_train_stage_accepts_token_filter():
    from lopd.pipeline.stages import pick
    from lopd.train.trainer import TrainConfig

    config = pick(TrainConfig, {"loss": "rkl_topk", "token_filter": "aligned", "token_filter_signal": "lightning"})
    assert config.token_filter == "aligned" and config.token_filter_signal == "lightning"
    assert TrainConfig().token_filter == "none"


@pytest.mark.slow
def test_train_with_aligned_token_filter_logs_kept_fraction(small_root, tmp_path):
    from lopd.train.trainer import TrainConfig, train

    cache = open_cache(small_root / "scores" / "s-r-align")
    config = TrainConfig(loss="rkl_topk", lr=1e-3, batch_size=8, steps=2, log_every=1, token_filter="aligned",
                         allow_teacher_mismatch=True)
    result = train(STUDENT, cache, config, tmp_path / "ckpt", quiet=True, root=small_root)
    rows = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 < r["filter_kept"] <= 1.0 for r in rows)
    assert result.final_metrics["filter_kept"] < 1.0 or result.final_metrics["filter_defined"] == 0.0
    lineage = json.loads((tmp_path / "ckpt" / "lopd_lineage.json").read_text())
    assert lineage["config"]["token_filter"] == "aligned"
    assert lineage["teacher_consistency"]["override"] is True  # the guard's override stays on record


@pytest.mark.slow
def test_diagnose_alignment_on_real_rollouts_and_scores(pool, root, tmp_path):
    """The real path: teacher rollouts (4 per prompt, temperature 1.5 so some fail) scored by the teacher with vLLM."""
    from lopd.rollout import SamplingConfig, rollout
    from lopd.score import ScoreConfig, score
    from lopd.toy import words

    prompts = [asdict(p) for p in words.make_prompts("test", 16)]
    rollouts, _ = rollout(TEACHER, prompts, SamplingConfig(n=4, temperature=1.5, max_tokens=10, seed=3), root=root,
                          verifier="lopd.toy.words:verify", llm=pool.get(TEACHER), quiet=True)
    result = score(TEACHER, rollouts, ScoreConfig(k=8, logprob_dtype="float32"), root=root, llm=pool.get(TEACHER),
                   quiet=True)
    out = tmp_path / "real"
    cli = invoke("diagnose", "alignment", "--cache", result.id, "--student", STUDENT, "--rows", "32",
                 "--out", str(out), "--root", str(root))
    assert cli.exit_code == 0, (cli.output, cli.exception)
    report = json.loads((out / "alignment.json").read_text())
    assert 0 < report["rows_sampled"] <= 32
    assert report["per_rollout"]["failed"]["count"] > 0 and report["per_rollout"]["successful"]["count"] > 0
    assert (out / "alignment.md").is_file() and (out / "alignment.png").is_file()
