"""Resumable `lopd train` (lopd.train.checkpoint), TensorBoard/W&B reporting and the non-finite guard.

The resume tests SIGKILL a real `lopd train` process at a chosen point (LOPD_CRASH_AT, lopd.faults), rerun the
same command, and compare with an uninterrupted run: final weights bit for bit (CPU, float32), every metrics row
exactly once, and ledger rows whose tokens add up to the uninterrupted run's. Inputs are small rollout and score
sets written without an engine (tests/toy_sets.py), so each run takes seconds plus DeepSpeed's start-up.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from child_env import subprocess_env
from safetensors.torch import load_file
from toy_sets import STUDENT, make_rollout_set, make_score_set, rollout_records

from lopd.cost.ledger import read_rows
from lopd.train.checkpoint import identity_change, run_identity
from lopd.train.config import TrainConfig

REWARDS = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0]]
# 24 rows, micro-batches of 4, 2 per step: 3 steps an epoch, so 10 steps cross epoch boundaries (resume at 3 and 7).
ARGS = ["--loss", "rkl_topk", "--steps", "10", "--batch-size", "8", "--micro-batch-size", "4", "--log-every", "1",
        "--save-every", "3", "--keep-checkpoints", "2", "--lr", "1e-3", "--seed", "1", "--allow-teacher-mismatch"]


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-root")
    make_score_set(root, make_rollout_set(root / "rollouts" / "r-resume", rollout_records(REWARDS)))
    make_rollout_set(root / "rollouts" / "r-no-verifier", [dict(r, reward=None) for r in rollout_records(REWARDS)])
    make_score_set(root, make_rollout_set(root / "rollouts" / "r-poisoned", rollout_records(REWARDS)), poison=(5,))
    return root


def lopd_train(root: Path, out: Path, *extra: str, crash_at: str | None = None,
               source: tuple[str, str] = ("--cache", "s-r-resume"), ranks: int = 1) -> subprocess.CompletedProcess:
    """`lopd train` in a subprocess (under torchrun with `ranks` > 1); `crash_at` SIGKILLs it there (every rank)."""
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"  # two shared cores: oversubscribed threads make each step seconds
    if crash_at:
        env["LOPD_CRASH_AT"] = crash_at
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    return subprocess.run([*launcher, "-m", "lopd.cli", "train", "--student", STUDENT, *source, "--out", str(out),
                           "--root", str(root), *ARGS, *extra], env=env, capture_output=True, text=True, timeout=900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error, and no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1]


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The saved weights: the full model, or a LoRA run's adapter."""
    (path,) = [p for p in out.glob("*.safetensors")]
    return load_file(path)


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(root: Path, out: Path) -> list[dict]:
    return [r for r in read_rows(root) if r["artifact"] == str(out.resolve())]


def assert_same_run(resumed: Path, reference: Path, steps: int = 10) -> None:
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ours, theirs = metric_rows(resumed), metric_rows(reference)
    assert [r["step"] for r in ours] == list(range(1, steps + 1))
    def steady(row: dict) -> dict:  # wall-clock rates and phase times differ between runs
        return {k: v for k, v in row.items() if k != "tokens_per_s" and not k.startswith("time/")}
    for mine, ref in zip(ours, theirs):
        assert steady(mine) == steady(ref)
    # TensorBoard too: the killed attempts' events after their checkpoint are purged, each step's loss is there once.
    assert tensorboard_scalars(resumed, "train/loss") == [(r["step"], pytest.approx(r["loss"], abs=1e-5)) for r in theirs]


def tensorboard_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# zero2 is killed twice (after a step, then inside a checkpoint save); LoRA dropout draws from the global torch RNG,
# so the lora run matches only if the RNG streams are restored.
VARIANTS = {"zero2": ["--zero-stage", "2"], "zero3": ["--zero-stage", "3"],
            "lora": ["--lora-rank", "4", "--lora-dropout", "0.2"]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_run_resumes_to_the_uninterrupted_result(train_root, tmp_path, variant):
    options = VARIANTS[variant]
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    done = lopd_train(train_root, reference, *options)
    assert done.returncode == 0, done.stderr[-3000:]

    # Killed after step 4 (checkpoint at 3, metrics rows up to 4), then during the save of step 6 (left .partial).
    killed = lopd_train(train_root, out, *options, crash_at="train_step:4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    kills = 1
    if variant == "zero2":
        killed = lopd_train(train_root, out, *options, crash_at="checkpoint_rename:1")
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".partial-step-00000006", "step-00000003"]
        kills += 1
    resumed = lopd_train(train_root, out, *options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000009", "step-00000010"]
    assert not (out / "attempt.json").exists()

    # Ledger: one row per attempt; the killed ones recovered as such, tokens counted once in all.
    rows = train_rows(train_root, out)
    outcomes = [r["extra"].get("outcome", "ok") for r in rows]
    assert outcomes == ["killed"] * kills + ["ok"]
    assert sum(r["tokens"] for r in rows) == train_rows(train_root, reference)[0]["tokens"] > 0
    assert all(r["wall_seconds"] > 0 for r in rows)
    assert rows[-1]["extra"]["resumed_from"] == 3

    # Rerunning the finished command resumes at its last step: nothing trained again, nothing counted again.
    again = lopd_train(train_root, out, *options)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(out, reference)
    assert train_rows(train_root, out)[-1]["tokens"] == 0


@pytest.mark.slow
def test_two_ranks_resume_to_the_uninterrupted_result(train_root, tmp_path):
    """Each rank writes its own ZeRO-2 optimizer partition and trainer state; rank 0 renames once all have."""
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    options = ["--micro-batch-size", "2"]  # 2 ranks x 2 rows x 2 accumulation steps = batch 8
    assert lopd_train(train_root, reference, *options, ranks=2).returncode == 0
    killed = lopd_train(train_root, out, *options, ranks=2, crash_at="train_step:4")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000003" / "state").iterdir()) == [
        "lopd_rank0.pt", "lopd_rank1.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = lopd_train(train_root, out, *options, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)
    rows = train_rows(train_root, out)
    assert [r["device_count"] for r in rows] == [2, 2] and rows[0]["extra"]["outcome"] == "killed"
    assert sum(r["tokens"] for r in rows) == train_rows(train_root, reference)[0]["tokens"]


ONLINE_SCRIPT = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from lopd.toy import STUDENT_BASE_DIR, TEACHER_DIR
from lopd.train.config import TrainConfig
from lopd.rollout import SamplingConfig
from lopd.train.online import OnlineSampler
from lopd.train.trainer import train

tok = AutoTokenizer.from_pretrained(str(STUDENT_BASE_DIR))
prompts = [tok(p)["input_ids"] for p in ("ab=", "c=", "qa=", "t=", "mo=")]
sampler = OnlineSampler(str(TEACHER_DIR), prompts, SamplingConfig(n=2, max_tokens=6), k=8, micro_batch_size=4,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3)
config = TrainConfig(loss="rkl_topk", steps=6, batch_size=8, micro_batch_size=4, save_every=2, log_every=1, lr=1e-3)
train(str(STUDENT_BASE_DIR), None, config, Path(sys.argv[1]), batches=sampler, quiet=True, root=Path(sys.argv[2]))
"""


@pytest.mark.slow
def test_online_run_resumes_its_live_stream(train_root, tmp_path):
    """The online baseline samples from the model being trained: the sampler's prompt RNG and torch's sampling RNG
    must both continue where the checkpoint left them."""
    def online(out: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
        env = subprocess_env() | {"OMP_NUM_THREADS": "1"}
        env |= {"LOPD_CRASH_AT": crash_at} if crash_at else {}
        return subprocess.run([sys.executable, "-c", ONLINE_SCRIPT, str(out), str(train_root)], env=env,
                              capture_output=True, text=True, timeout=900)

    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert online(reference).returncode == 0
    assert online(out, "train_step:3").returncode == -9
    resumed = online(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference, steps=6)


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(train_root, tmp_path):
    out = tmp_path / "run"
    assert lopd_train(train_root, out, "--steps", "3").returncode == 0
    changed = lopd_train(train_root, out, "--steps", "3", "--lr", "2e-3")
    error = error_line(changed)
    assert "lr: 0.001 -> 0.002" in error and "checkpoints" in error
    # Logging options may change; a longer run under a constant schedule continues the same run.
    longer = lopd_train(train_root, out, "--steps", "4", "--log-every", "2", "--report-to", "none")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3, 4]


def test_truncate_jsonl_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    from lopd.train.checkpoint import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n'
    truncate_jsonl(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()


def test_identity_rules():
    base = run_identity(TrainConfig(lr_schedule="constant"), "s", ["a"], 1)
    assert identity_change(base, run_identity(TrainConfig(steps=9, log_every=3, report_to="none"), "s", ["a"], 1)) is None
    assert identity_change(base, run_identity(TrainConfig(seed=1), "s", ["a"], 1)) == "seed: 0 -> 1"
    assert identity_change(base, run_identity(TrainConfig(), "s", ["b"], 1)) == "inputs: ['a'] -> ['b']"
    assert identity_change(base, run_identity(TrainConfig(), "s", ["a"], 2)) == "world_size: 1 -> 2"
    assert identity_change(base, run_identity(TrainConfig(), "s", ["a"], 1, "k2")) == "key: None -> k2"
    cosine = run_identity(TrainConfig(lr_schedule="cosine"), "s", ["a"], 1)
    assert identity_change(cosine, run_identity(TrainConfig(lr_schedule="cosine", steps=9), "s", ["a"], 1)) == \
        "steps: None -> 9"


def test_loop_state_round_trip_keeps_drift_and_refreshed_rows(train_root, tmp_path):
    """What a refreshing run needs to resume (lopd.train.refresh needs vLLM, so the state is checked here, not a kill)."""
    from lopd.cache import open_cache
    from lopd.train.checkpoint import loop_state, restore_loop_state
    from lopd.train.data import SequenceDataset
    from lopd.train.drift import ShardDrift
    from lopd.train.refresh import Refresher

    cache, fresh = open_cache(train_root / "scores" / "s-r-resume"), open_cache(train_root / "scores" / "s-r-poisoned")
    drift = ShardDrift(16)
    drift.add({"tokens": torch.tensor([3.0, 4.0]), "weight": torch.tensor([2.5, 3.0])}, torch.tensor([1, 20]))
    refresher = Refresher(cache, SequenceDataset(cache), None, tmp_path)
    refresher.dataset.replace(7, fresh, 0)
    refresher.generations, refresher.rows_refreshed, refresher.rollout_seconds = [{"step": 5}], 1, 2.5
    state = loop_state(micro_batches=6, tokens=40, seconds=1.0, window={"loss": [1.0]}, skipped=0, drift=drift,
                       refresher=refresher, live=None, report_id="r")
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)

    drift2, refresher2 = ShardDrift(16), Refresher(cache, SequenceDataset(cache), None, tmp_path)
    restore_loop_state(state, drift2, refresher2, None)
    assert drift2.overall.sums == drift.overall.sums and drift2.shards.keys() == {0, 1}
    assert drift2.shards[1].summary() == drift.shards[1].summary()
    assert {row: (c.path, j) for row, (c, j) in refresher2.dataset.replaced.items()} == {7: (fresh.path, 0)}
    assert refresher2.dataset[7]["teacher_logprobs"].tolist() == fresh[0].teacher_logprobs.tolist() != \
        cache[7].teacher_logprobs.tolist()
    assert refresher2.summary() == refresher.summary()


# -- reporting


@pytest.mark.slow
def test_tensorboard_events_hold_the_loss(train_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = lopd_train(train_root, out, "--steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/rkl", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/kl",
            "train/importance_weight"} <= set(tags)
    rows = metric_rows(out)
    assert tensorboard_scalars(out, "train/loss") == [(r["step"], pytest.approx(r["loss"], abs=1e-5)) for r in rows]
    # Each row times the loop's phases (mean seconds per step since the previous row); the reporter gets them too.
    phases = {f"time/{name}" for name in ("data", "refresh", "forward_backward", "step", "checkpoint")}
    assert all(phases <= row.keys() and all(row[k] >= 0 for k in phases) for row in rows)
    assert all(row["time/forward_backward"] > 0 for row in rows)
    assert {f"train/{key}" for key in phases} <= set(tags)
    assert tensorboard_scalars(out, "train/grad_norm") == [
        (r["step"], pytest.approx(r["grad_norm"], abs=1e-5)) for r in rows]


@pytest.mark.slow
def test_wandb_offline_run(train_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = lopd_train(train_root, out, "--steps", "2", "--report-to", "wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert not (out / "tb").exists()


# -- non-finite losses and gradients


def test_nonfinite_message_names_the_field_or_says_the_inputs_were_finite():
    from lopd.train.data import collate
    from lopd.train.nonfinite import nonfinite_message

    item = {"prompt_ids": np.array([1, 4]), "response_ids": np.array([5, 6]), "behaviour_logprobs": np.zeros(2),
            "reward": float("nan"), "group_id": 0, "rubric_reward": float("nan")}
    assert nonfinite_message(3, "grpo", "loss", collate([item], pad_id=0)) == (
        "non-finite loss at step 3 (loss 'grpo'): the batch's 'rewards' holds NaN/inf (rewards are NaN for rollouts "
        "made without `lopd rollout --verifier`); --skip-nonfinite skips such steps instead")
    message = nonfinite_message(8, "srpo", "gradient norm", collate([dict(item, reward=1.0)], pad_id=0))
    assert message.startswith("non-finite gradient norm at step 8 (loss 'srpo'): its inputs are finite, so the student "
                              "diverged") and "\n" not in message  # a NaN rubric reward only marks an unjudged row


def test_rewards_of_a_rollout_set_without_verifier_are_not_available(train_root):
    from lopd.rollout_set import RolloutSet
    from lopd.train.data import available_fields

    assert "rewards" not in available_fields(RolloutSet.open(train_root / "rollouts" / "r-no-verifier"))
    assert "rewards" in available_fields(RolloutSet.open(train_root / "rollouts" / "r-resume"))


@pytest.mark.slow
def test_grpo_without_rewards_fails_before_training(train_root, tmp_path):
    result = lopd_train(train_root, tmp_path / "run", "--loss", "grpo", source=("--rollouts", "r-no-verifier"))
    assert error_line(result) == (
        "error: loss 'grpo' needs 'rewards', which this cache lacks; produce it with "
        "`lopd rollout --verifier module:function`")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nonfinite_loss_stops_training_with_the_step_and_cause(train_root, tmp_path):
    result = lopd_train(train_root, tmp_path / "run", source=("--cache", "s-r-poisoned"))
    error = error_line(result)
    assert re.fullmatch(r"error: non-finite loss at step \d+ \(loss 'rkl_topk'\): the batch's 'teacher_logprobs' "
                        r"holds NaN/inf; --skip-nonfinite skips such steps instead", error), error
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts_the_steps(train_root, tmp_path):
    out = tmp_path / "run"
    result = lopd_train(train_root, out, "--skip-nonfinite", "--steps", "9", source=("--cache", "s-r-poisoned"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metric_rows(out)
    skipped = rows[-1]["nonfinite_skipped"]
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # a skipped batch's NaN stays out of the means
    # 9 steps are 3 epochs, and row 5 is in one micro-batch per epoch: every step that read it was skipped, no other.
    assert skipped == 3 and [r["nonfinite_skipped"] for r in rows] == sorted(r["nonfinite_skipped"] for r in rows)
