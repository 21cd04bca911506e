"""vLLM engine options (`--engine-arg`, pipeline `[engine]` tables), set ids that follow them, and lengths.

Most tests stop at the `vllm.LLM` constructor (a spy records its arguments and raises), so they check what
would reach vLLM without starting an engine. The last test starts two real engines through the CLI: a rollout
whose context is too small for its answers, then scoring that set with default options.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from toy_sets import one_row_rollout_set

from lopd.cli import main
from lopd.engine import EnginePool, check_engine_args
from lopd.errors import LopdError
from lopd.fingerprint import digest_json
from lopd.pipeline.plan import load_spec, plan
from lopd.pipeline.run import run_pipeline
from lopd.rollout import SamplingConfig, rollout
from lopd.rollout_set import RolloutSet, write_rollout_set
from lopd.score import ScoreConfig, score_set_identity
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR

TEACHER, STUDENT = str(TEACHER_DIR), str(STUDENT_BASE_DIR)
# The options the issue names, as a user types them, and the values vLLM must receive.
TYPED = {"tensor_parallel_size": ("2", 2), "pipeline_parallel_size": ("2", 2), "data_parallel_size": ("2", 2),
         "gpu_memory_utilization": ("0.5", 0.5), "max_model_len": ("48", 48), "max_num_batched_tokens": ("2048", 2048),
         "dtype": ("bfloat16", "bfloat16"), "quantization": ("fp8", "fp8"), "enforce_eager": ("false", False),
         "kv_cache_dtype": ("fp8", "fp8"), "seed": ("7", 7)}


class EngineStarted(Exception):
    """Raised by the spy in place of starting vLLM."""


@pytest.fixture()
def spy(monkeypatch) -> list[dict]:
    """Replaces vllm.LLM: records the keyword arguments of each construction, then stops the command."""
    import vllm

    calls: list[dict] = []

    def fake_llm(**kwargs):
        calls.append(kwargs)
        raise EngineStarted

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    return calls


@pytest.fixture()
def rollout_set(tmp_path) -> RolloutSet:
    """A tiny hand-made rollout set of the toy teacher (longest row: 6 tokens)."""
    return one_row_rollout_set(tmp_path / "root" / "rollouts" / "r-test", TEACHER)


def engine_flags() -> list[str]:
    return [arg for key, (text, _) in TYPED.items() for arg in ("--engine-arg", f"{key}={text}")]


def invoke(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    assert isinstance(result.exception, EngineStarted), (result.output, result.exception)


def test_every_named_option_reaches_llm_from_lopd_score(spy, rollout_set, tmp_path):
    invoke("score", "--teacher", TEACHER, "--rollouts", str(rollout_set.path), "--root", str(tmp_path / "root"),
           *engine_flags())
    (kwargs,) = spy
    assert {k: kwargs[k] for k in TYPED} == {k: value for k, (_, value) in TYPED.items()}
    assert not (tmp_path / "root" / "scores").exists() or not any((tmp_path / "root" / "scores").rglob("shards/*"))


def test_scoring_defaults_size_the_engine_from_the_longest_row(spy, rollout_set, tmp_path):
    invoke("score", "--teacher", TEACHER, "--rollouts", str(rollout_set.path), "--root", str(tmp_path / "root"))
    (kwargs,) = spy
    assert kwargs["max_model_len"] == 4 + 2 + 1  # prompt + response + the output token vLLM needs
    assert kwargs["max_num_batched_tokens"] == 4096


def test_a_row_longer_than_the_teacher_context_is_refused_before_anything_is_written(spy, tmp_path):
    from transformers import AutoTokenizer

    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
    from lopd.score import score

    records = [{"prompt_id": f"p{i}", "group_id": i, "sample_index": 0, "prompt": "ab=", "answer": "c",
                "prompt_ids": [1, 4, 5, 40], "response_ids": [6] * n, "behaviour_logprobs": [-1.0] * n,
                "finish_reason": "length", "reward": 0.0} for i, n in enumerate((2, 60, 3))]
    meta = {"id": "r-long", "model": TEACHER, "model_fingerprint": model_fingerprint(TEACHER),
            "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(TEACHER))}
    rollouts = write_rollout_set(tmp_path / "root" / "rollouts" / "r-long", records, meta)
    with pytest.raises(LopdError, match=r"rollout row 1 \(prompt p1\) has 64 tokens and scoring it needs 65, more "
                                        r"than the engine's context of 64; this teacher cannot score it"):
        score(TEACHER, rollouts, ScoreConfig(), root=tmp_path / "root")
    with pytest.raises(LopdError, match=r"needs 65, more than the engine's context of 32; raise --engine-arg "
                                        r"max_model_len to 65"):
        score(TEACHER, rollouts, ScoreConfig(), root=tmp_path / "root", engine_args={"max_model_len": 32})
    assert not spy and not (tmp_path / "root" / "scores").exists()


def test_train_takes_engine_options_only_for_refresh_engines(tmp_path, rollout_set):
    result = CliRunner().invoke(main, ["train", "--student", STUDENT, "--rollouts", str(rollout_set.path), "--loss",
                                       "sft", "--out", str(tmp_path / "ck"), "--root", str(tmp_path / "root"),
                                       "--engine-arg", "tensor_parallel_size=2"])
    assert result.exit_code == 2 and "it needs --refresh" in result.output


def test_rollout_and_eval_pass_engine_options(spy, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ab="}) + "\n")
    invoke("rollout", "--model", STUDENT, "--prompts", str(prompts), "--root", str(tmp_path),
           "--engine-arg", "max_model_len=48", "--engine-arg", "gpu_memory_utilization=0.3")
    invoke("eval", "--model", STUDENT, "--prompts", str(prompts), "--verifier", "lopd.toy.words:verify", "--root", str(tmp_path),
           "--engine-arg", "tensor_parallel_size=2")
    assert (spy[0]["max_model_len"], spy[0]["gpu_memory_utilization"]) == (48, 0.3)
    assert spy[1]["tensor_parallel_size"] == 2 and "max_model_len" not in spy[1]  # the model's own context


def test_refresh_engines_get_the_pool_options(spy):
    """`lopd train --refresh --engine-arg ...` hands its options to the EnginePool the refresher builds from."""
    pool = EnginePool(engine_args=check_engine_args({"max_model_len": "32"}))
    with pytest.raises(EngineStarted):
        pool.get(STUDENT, {"seed": 3})
    assert (spy[0]["max_model_len"], spy[0]["seed"]) == (32, 3)


def write_pipeline(tmp_path: Path, engine: str, stage_engine: str = "{ seed = 5 }") -> Path:
    path = tmp_path / "engine_toy.toml"
    path.write_text(f"""
name = "engine_toy"
[engine]
{engine}
[models]
teacher = {{ path = "toy:teacher", engine = {{ tensor_parallel_size = 2, max_model_len = 40 }} }}
[prompts]
opd = {{ toy = "opd", n = 4 }}
[[stages]]
id = "teacher_rollouts"
run = "rollout"
model = "teacher"
prompts = "opd"
max_tokens = 8
engine = {stage_engine}
""")
    return path


def test_pipeline_engine_tables_reach_llm(spy, tmp_path):
    spec = load_spec(write_pipeline(tmp_path, "gpu_memory_utilization = 0.4\nmax_model_len = 20"))
    with pytest.raises(EngineStarted):
        run_pipeline(spec, tmp_path / "root")
    (kwargs,) = spy
    # global < the model's own table < the stage's table
    assert (kwargs["gpu_memory_utilization"], kwargs["tensor_parallel_size"], kwargs["max_model_len"],
            kwargs["seed"]) == (0.4, 2, 40, 5)


def test_pipeline_engine_options_in_stage_keys_only_when_numbers_change(tmp_path):
    def key(engine: str, stage_engine: str = "{ seed = 5 }") -> str:
        return plan(load_spec(write_pipeline(tmp_path, engine, stage_engine)), tmp_path)[0].stages[0].key

    base = key("gpu_memory_utilization = 0.4")
    assert key("gpu_memory_utilization = 0.9") == base  # where and how fast: same results
    assert key("gpu_memory_utilization = 0.4", "{ seed = 5, tensor_parallel_size = 4 }") == base
    assert key("gpu_memory_utilization = 0.4", "{ seed = 5, dtype = 'bfloat16' }") != base


def test_unknown_or_mistyped_option_in_a_pipeline_is_refused_at_plan_time(tmp_path):
    with pytest.raises(LopdError, match=r"pipeline \[engine\] tensor_paralel_size: not a vLLM engine option; "
                                        r"did you mean tensor_parallel_size"):
        plan(load_spec(write_pipeline(tmp_path, "tensor_paralel_size = 2")), tmp_path)
    with pytest.raises(LopdError, match=r"pipeline stage 'teacher_rollouts' engine dtype='float64': expected one of"):
        plan(load_spec(write_pipeline(tmp_path, "", "{ dtype = 'float64' }")), tmp_path)


def test_engine_options_are_typed_by_vllm():
    assert check_engine_args({k: text for k, (text, _) in TYPED.items()}) == {k: v for k, (_, v) in TYPED.items()}
    assert check_engine_args({"hf_overrides": '{"rope_theta": 1e6}', "enable_prefix_caching": "none"}) == {
        "hf_overrides": {"rope_theta": 1e6}, "enable_prefix_caching": None}
    for bad, message in [({"tensor_parallel_size": "two"}, "tensor_parallel_size='two': expected int"),
                         ({"enforce_eager": "maybe"}, "expected bool"),
                         ({"model": "x"}, "lopd sets it from --model"),
                         ({"max_model_length": "8"}, "did you mean max_model_len")]:
        with pytest.raises(LopdError, match=message):
            check_engine_args(bad)


def test_score_set_ids_follow_numeric_engine_options(rollout_set):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TEACHER)

    def set_id(**engine_args) -> str:
        return digest_json(score_set_identity(TEACHER, tokenizer, rollout_set, ScoreConfig(), engine_args))

    plain = score_set_identity(TEACHER, tokenizer, rollout_set, ScoreConfig())
    assert "engine_args" not in plain["config"]  # score sets made without engine options keep their ids
    assert set_id(dtype="float32") != set_id(dtype="bfloat16")
    assert set_id(dtype="float16") == set_id(dtype="half")  # vLLM's aliases are one dtype
    assert set_id(max_model_len=48) != set_id() and set_id(quantization="fp8") != set_id()
    assert set_id(kv_cache_dtype="fp8") != set_id()
    assert set_id(tensor_parallel_size=4, gpu_memory_utilization=0.5) == set_id()  # same numbers


def test_bad_prompts_are_named_before_the_engine_starts(spy, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "ab="}, {"prompt": "  ", "id": "blank"}]))
    sampling = SamplingConfig(max_tokens=8)
    with pytest.raises(LopdError, match=rf"prompt blank \({prompts} line 2\) is empty; .*--skip-invalid"):
        rollout(STUDENT, prompts, sampling, root=tmp_path)
    prompts.write_text(json.dumps({"prompt": "ab="}) + "\n" + json.dumps({"prompt": "a" * 70 + "="}) + "\n")
    with pytest.raises(LopdError, match=rf"prompt p-1 \({prompts} line 2\) has 72 tokens; the engine's context of 64"):
        rollout(STUDENT, prompts, sampling, root=tmp_path)
    with pytest.raises(LopdError, match=r"--max-tokens 64 does not fit the context of .* \(64 tokens"):
        rollout(STUDENT, prompts, SamplingConfig(max_tokens=64), root=tmp_path, skip_invalid=True)
    with pytest.raises(LopdError, match="max_model_len=100 exceeds the context"):
        rollout(STUDENT, prompts, sampling, root=tmp_path, engine_args={"max_model_len": 100})
    assert not spy and not (tmp_path / "rollouts").exists()


def lopd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lopd.cli", *args], capture_output=True, text=True)


def test_cli_refuses_an_unknown_option_in_one_line(tmp_path, rollout_set):
    result = lopd("score", "--teacher", TEACHER, "--rollouts", str(rollout_set.path), "--root", str(tmp_path / "root"),
                  "--engine-arg", "tensor_paralel_size=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("error: --engine-arg tensor_paralel_size: not a vLLM engine option; did you mean "
                                     "tensor_parallel_size, data_parallel_size, pipeline_parallel_size?")
    assert not (tmp_path / "root" / "scores").exists()


@pytest.mark.slow
def test_rollout_cut_by_a_small_context_then_scored_with_defaults(tmp_path):
    """Real engines: rows that hit the rollout's context limit are reported, and all of them can be scored."""
    from lopd.cache import open_cache
    from lopd.toy import words

    prompts = tmp_path / "p.jsonl"
    rows = [{"id": p.id, "prompt": p.prompt, "answer": p.answer} for p in words.make_prompts("test", 12)]
    rows += [{"id": "empty", "prompt": ""}, {"id": "long", "prompt": "abcdefgh="}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = str(tmp_path / "root")
    made = lopd("rollout", "--model", TEACHER, "--prompts", str(prompts), "--n", "2", "--max-tokens", "9",
                "--engine-arg", "max_model_len=10", "--skip-invalid", "--root", root)
    assert made.returncode == 0, made.stderr
    assert "lopd: vLLM engine " in made.stderr and "max_model_len=10" in made.stderr
    rollouts = RolloutSet.open(json.loads(made.stdout)["path"])
    truncated = rollouts.meta["truncated"]
    # max_tokens 9 never binds with 3-4 prompt tokens in a context of 10: every cut is the context's
    assert truncated["max_model_len"] == 10 and 0 < truncated["at_context"] == truncated["length"]
    assert f"warning: {truncated['length']} of {len(rollouts)} rollouts stopped at the length limit" in made.stderr
    assert rollouts.meta["skipped_prompts"] == {"empty": 1, "too_long": 1, "ids": ["empty", "long"]}
    lengths = [len(p) + len(r) for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)]
    assert max(lengths) == 9  # the context minus the position kept free for scoring
    assert rollouts.meta["engine"] and rollouts.meta["sampling"]["max_tokens"] == 9

    scored = lopd("score", "--teacher", TEACHER, "--rollouts", rollouts.id, "--k", "4", "--root", root)
    assert scored.returncode == 0, scored.stderr
    assert "max_model_len=10" in scored.stderr and "max_num_batched_tokens=4096" in scored.stderr
    cache = open_cache(json.loads(scored.stdout)["path"])
    assert cache.manifest["complete"] and len(cache) == len(rollouts)
    assert json.loads(scored.stdout)["positions"] == rollouts.meta["num_response_tokens"]
