"""Multi-turn tool-use rollouts: the calculator world, step spans, observation masking and rubric rewards.

The fast tests need no engine; the slow ones roll out the bundled calculator teacher through real vLLM with
the calculator in the loop.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lopd.environment import ToolEnvironment, load_environment
from lopd.errors import LopdError
from lopd.rollout_set import RolloutSet, write_rollout_set
from lopd.toy import CALC_TEACHER_DIR, calc
from lopd.train.data import SequenceDataset, collate

CALC_TEACHER = str(CALC_TEACHER_DIR)
TOOL, VERIFIER, JUDGE = "lopd.toy.calc:ENVIRONMENT", "lopd.toy.calc:verify", "lopd.toy.calc:judge"


# --- the calculator world, no engine -------------------------------------------------------------------------


def test_calc_world_reference_trace_verifier_and_judge():
    row = {"prompt": "12*7+5="}
    assert calc.evaluate_left_to_right("12*7+5=") == 89
    assert calc.evaluate_left_to_right("3-9*2=") == -12  # left to right, not precedence
    assert calc.reference_steps("12*7+5=") == [("[12*7]", "84;"), ("[84+5]", "89;"), ("89", "")]
    ideal = "[12*7]84;[84+5]89;89"
    assert calc.verify(row, ideal) == 1.0
    assert calc.verify(row, "[12*7]84;[84+5]89;88") == 0.0
    assert calc.verify(row, "89") == 1.0  # an unaided correct answer still verifies
    assert calc.verify({"prompt": "not an expression"}, "89") == 0.0
    assert calc.judge(row, ideal) == 1.0
    assert calc.judge(row, "89") == pytest.approx(5 / 6)  # did not use the calculator
    assert calc.judge(row, "[12*7]84;[84+5]89;[89+0]89;89") == pytest.approx(5 / 6)  # one call too many
    assert calc.judge(row, "[12*]?;[84+5]89;89") == pytest.approx(5 / 6)  # a malformed call
    assert calc.judge(row, "[12*7]84;[84+5]89;90") == pytest.approx(3 / 6)
    assert 0.0 <= calc.judge(row, "") <= 1.0


def test_words_judge_weighs_its_rubric_items():
    from lopd.toy import words

    valid = sorted(words.dictionary())[0]
    row = {"prompt": valid[:2] + "="}
    assert words.judge(row, valid[2:]) == 1.0
    assert words.judge(row, valid[2:] + "qqqqqqq") == pytest.approx(1 / 5)  # letters only; not a word, too long
    assert words.judge(row, "zz9") == pytest.approx(1 / 5)  # not a word, not only letters; a dictionary length
    assert words.judge(row, "") == 0.0


def test_calc_environment_observes_only_pending_calls():
    env = calc.ENVIRONMENT
    assert load_environment(TOOL) is env
    assert env.stop == ("]",) and env.max_calls >= 2
    row = {"prompt": "12*7+5="}
    assert env.observe(row, "[12*7]") == "84;"
    assert env.observe(row, "[12*7]84;[84+5]") == "89;"
    assert env.observe(row, "[-3*4]") == "-12;"
    assert env.observe(row, "[12**7]") == "?;"
    assert env.observe(row, "[12*7]84;89") is None  # the final answer: no call pending


def test_calc_prompts_are_deterministic_and_fit_the_toy_models():
    a, b = calc.make_prompts("eval", 200), calc.make_prompts("eval", 200)
    assert a == b and a != calc.make_prompts("test", 200)
    for p in a:
        assert p.answer == str(calc.evaluate_left_to_right(p.prompt))
        assert 1 <= len(calc.parse_expression(p.prompt)[1]) <= 2
        trace = "".join(s + o for s, o in calc.reference_steps(p.prompt))
        assert 1 + len(p.prompt) + len(trace) + 1 <= 64  # <bos> + prompt + trace + <eos> within 64 positions


def test_tool_environment_loader_errors():
    with pytest.raises(LopdError, match="module:attribute"):
        load_environment("lopd.toy.calc")
    with pytest.raises(LopdError, match="cannot load tool environment"):
        load_environment("lopd.toy.calc:NOPE")
    with pytest.raises(LopdError, match="lacks"):
        load_environment("lopd.toy.calc:verify")  # a function, not an environment


# --- rollout set columns and training batches, no engine ----------------------------------------------------

OLD_SCHEMA = pa.schema([(f.name, f.type) for f in __import__("lopd.rollout_set", fromlist=["SCHEMA"]).SCHEMA
                        if f.name not in ("step_spans", "rubric_reward")])


def _record(i: int, response: list[int], **extra) -> dict:
    return dict({"prompt_id": f"p{i}", "group_id": i, "sample_index": 0, "prompt": "1+2=", "answer": "3",
                 "prompt_ids": [1, 30, 66, 31, 40], "response_ids": response,
                 "behaviour_logprobs": [-0.5] * len(response), "finish_reason": "stop", "reward": 1.0}, **extra)


def test_old_format_rollout_set_without_new_columns_still_opens(tmp_path):
    path = tmp_path / "r-old"
    path.mkdir()
    records = [_record(0, [5, 6, 7]), _record(1, [8, 9])]
    pq.write_table(pa.Table.from_pylist(records, schema=OLD_SCHEMA), path / "rollouts.parquet")
    (path / "meta.json").write_text(json.dumps({"id": "r-old", "num_rows": 2, "num_response_tokens": 5}))
    rollouts = RolloutSet.open(path)
    assert "step_spans" not in rollouts.table.column_names
    assert rollouts.step_spans == [[(0, 3)], [(0, 2)]]
    assert np.isnan(rollouts.rubric_rewards).all()
    np.testing.assert_array_equal(rollouts.loss_mask(0), np.ones(3, np.float32))
    batch = collate([SequenceDataset(rollouts)[i] for i in range(2)], pad_id=0)
    assert batch.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert "rubric_rewards" not in batch.fields


def test_collate_masks_observation_tokens_and_carries_rubric_rewards(tmp_path):
    # row 0: [ 1 + 2 ] (model) 3 ; (observation) 3 <eos> (model); row 1: a plain rollout; row 2: no spans recorded
    records = [
        _record(0, list(range(10, 22)), step_spans=[[0, 5], [7, 12]], rubric_reward=0.5,
                behaviour_logprobs=[-0.5] * 5 + [0.0] * 2 + [-0.5] * 5),
        _record(1, [5, 6, 7], step_spans=[[0, 3]], rubric_reward=1.0),
        _record(2, [8, 9]),
    ]
    rollouts = write_rollout_set(tmp_path / "r-tool", records, {"id": "r-tool"})
    assert rollouts.step_spans[0] == [(0, 5), (7, 12)]
    assert rollouts.step_spans[2] == [(0, 2)]
    np.testing.assert_array_equal(rollouts.loss_mask(0), [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1])
    rubric = rollouts.rubric_rewards
    assert rubric[:2].tolist() == [0.5, 1.0] and math.isnan(rubric[2])
    batch = collate([SequenceDataset(rollouts)[i] for i in range(3)], pad_id=0)
    assert batch.mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
    assert batch.mask[1].tolist() == [1, 1, 1] + [0] * 9
    assert batch.mask[2].tolist() == [1, 1] + [0] * 10
    assert batch.num_tokens == 10 + 3 + 2
    got = batch.fields["rubric_rewards"]
    assert got[:2].tolist() == [0.5, 1.0] and torch.isnan(got[2])
    # live-sampled items (the online sampler) carry no loss mask: every response token counts
    live = collate([{"prompt_ids": np.array([1, 2]), "response_ids": np.array([3, 4, 5]),
                     "behaviour_logprobs": np.zeros(3, np.float32), "reward": float("nan"), "group_id": 0}], pad_id=0)
    assert live.mask.tolist() == [[1, 1, 1]] and "rubric_rewards" not in live.fields


def test_plain_rollout_identity_gains_no_tool_or_judge_key():
    from lopd.models.loading import load_tokenizer
    from lopd.prompts import PLAIN
    from lopd.rollout import SamplingConfig, rollout_identity

    from lopd.toy import TEACHER_DIR

    model = str(TEACHER_DIR)
    tok = load_tokenizer(model)
    rows = [{"id": "a", "prompt": "1+2="}]
    ids = [tok("1+2=")["input_ids"]]
    plain = rollout_identity(model, tok, SamplingConfig(), rows, ids, VERIFIER, PLAIN)
    assert set(plain) == {"kind", "model_fingerprint", "tokenizer_fingerprint", "sampling", "prompts", "verifier"}
    tooled = rollout_identity(model, tok, SamplingConfig(), rows, ids, VERIFIER, PLAIN, tool=TOOL,
                              env=calc.ENVIRONMENT, judge=JUDGE)
    assert tooled["tool"] == {"name": "calc", "stop": ["]"], "max_calls": calc.ENVIRONMENT.max_calls, "spec": TOOL}
    assert tooled["judge"] == JUDGE
    assert {k: v for k, v in tooled.items() if k not in ("tool", "judge")} == plain


# --- the calculator teacher through real vLLM ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_rollouts(pool, root):
    from lopd.rollout import SamplingConfig, rollout

    prompts = [asdict(p) for p in calc.make_prompts("eval", 32)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=48, seed=0)
    rollouts, reused = rollout(CALC_TEACHER, prompts, sampling, root=root, verifier=VERIFIER, tool=TOOL, judge=JUDGE,
                               llm=pool.get(CALC_TEACHER), quiet=True)
    assert not reused
    return rollouts


@pytest.mark.slow
def test_tool_rollouts_record_steps_observations_and_rewards(tool_rollouts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CALC_TEACHER)
    rollouts = tool_rollouts
    assert len(rollouts) == 64 and rollouts.meta["tool"]["spec"] == TOOL and rollouts.meta["judge"] == JUDGE
    assert sorted(set(rollouts.group_ids)) == list(range(32))
    assert rollouts.table.column("sample_index").to_pylist() == [0, 1] * 32
    assert rollouts.rewards.mean() > 0.7  # the teacher solves most expressions with the calculator
    rubric = rollouts.rubric_rewards
    assert np.isfinite(rubric).all() and (rubric >= 0).all() and (rubric <= 1).all() and rubric.mean() > 0.7
    three_steps = 0
    for i, row in enumerate(rollouts.rows()):
        response = rollouts.response_ids[i]
        spans = rollouts.step_spans[i]
        mask = rollouts.loss_mask(i)
        lps = rollouts.behaviour_logprobs[i]
        assert spans[0][0] == 0 and all(a < b for a, b in spans)
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # observations lie between spans
        assert (lps[mask == 0] == 0.0).all()
        text = ""
        for (a, b), nxt in zip(spans, [s[0] for s in spans[1:]] + [None]):
            text += tok.decode(response[a:b], skip_special_tokens=True)
            if nxt is None:
                continue
            observation = tok.decode(response[b:nxt], skip_special_tokens=True)
            assert text.endswith("]")  # an observation follows a call
            assert observation == calc.calculator(calc.pending_call(text))  # ... and is the calculator's result
            text += observation
        assert tok.decode(response, skip_special_tokens=True) == text
        assert row["reward"] == calc.verify(row, text) and row["rubric_reward"] == pytest.approx(calc.judge(row, text))
        ops = len(calc.parse_expression(row["prompt"])[1])
        if ops == 2 and len(calc.calls(text)) == 2:
            assert len(spans) == 3 and int((mask == 0).sum()) > 0
            three_steps += 1
    assert three_steps >= 10


@pytest.mark.slow
def test_tool_rollout_behaviour_logprobs_match_transformers(tool_rollouts):
    """Continuing from prompt + response-so-far ids gives the model's own log-probs on every generated token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(CALC_TEACHER, dtype=torch.float32).eval()
    for i in range(4):
        prompt, response = tool_rollouts.prompt_ids[i], tool_rollouts.response_ids[i]
        ids = torch.tensor(np.concatenate([prompt, response]))[None]
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        ref = logp[len(prompt) - 1 : len(prompt) - 1 + len(response)].gather(-1, torch.tensor(response)[:, None])[:, 0]
        mask = torch.from_numpy(tool_rollouts.loss_mask(i)).bool()
        got = torch.tensor(tool_rollouts.behaviour_logprobs[i])
        torch.testing.assert_close(got[mask], ref[mask], atol=2e-3, rtol=0)


@pytest.mark.slow
def test_tool_rollout_batches_mask_observations_out(tool_rollouts):
    items = [SequenceDataset(tool_rollouts)[i] for i in range(8)]
    batch = collate(items, pad_id=0)
    for b, item in enumerate(items):
        n = len(item["response_ids"])
        assert batch.mask[b, :n].tolist() == item["loss_mask"].tolist()
        assert batch.mask[b, n:].sum() == 0
    assert batch.num_tokens < sum(len(i["response_ids"]) for i in items)
    assert torch.isfinite(batch.fields["rubric_rewards"]).all()


@pytest.mark.slow
def test_eval_with_tool_runs_the_same_loop(pool):
    from lopd.evaluate import evaluate
    from lopd.rollout import SamplingConfig

    prompts = [asdict(p) for p in calc.make_prompts("eval", 32)]
    result = evaluate(CALC_TEACHER, prompts, VERIFIER, SamplingConfig(max_tokens=48), tool=TOOL, llm=pool.get(CALC_TEACHER))
    assert result.samples == 32 and result.accuracy > 0.7
    plain = evaluate(CALC_TEACHER, prompts, VERIFIER, SamplingConfig(max_tokens=48), llm=pool.get(CALC_TEACHER))
    assert plain.accuracy < result.accuracy  # without the tool's observations the teacher cannot finish


def test_tool_environment_dataclass_describes_itself():
    env = ToolEnvironment(name="x", stop=("]",), max_calls=2, observe=lambda row, text: None)
    assert env.describe() == {"name": "x", "stop": ["]"], "max_calls": 2}


def test_multi_turn_rounds_are_split_so_no_prefill_is_chunked():
    from lopd.rollout import _step_sized_chunks, turn_seed

    assert _step_sized_chunks([10, 10, 10], 25, 10) == [(0, 2), (2, 3)]  # token budget per engine step
    assert _step_sized_chunks([1] * 5, 100, 2) == [(0, 2), (2, 4), (4, 5)]  # sequences per engine step
    assert _step_sized_chunks([], 5, 5) == []
    assert turn_seed(3, 7, 0) == 3 * 1_000_003 + 7  # round 0 draws what `seeded` gives request 7
    assert len({turn_seed(0, r, t) for r in range(50) for t in range(5)}) == 250
