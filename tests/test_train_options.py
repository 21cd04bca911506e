"""`lopd train` options and pipeline train stages are one set (TrainConfig), validated the same way."""
from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from click.testing import CliRunner

from lopd.cli import main
from lopd.errors import LopdError
from lopd.train.config import TrainConfig
from lopd.train.trainer import lr_factor

HAND_WRITTEN = {"loss": "--loss", "loss_args": "--loss-arg", "refresh": "--refresh"}


def train_option_names() -> set[str]:
    return {opt for param in main.commands["train"].params for opt in param.opts}


def test_every_train_config_field_is_a_train_option():
    names = train_option_names()
    for f in fields(TrainConfig):
        flag = HAND_WRITTEN.get(f.name, f"--{f.name.replace('_', '-')}")
        assert flag in names, f"TrainConfig.{f.name} has no `lopd train` option {flag}"


@pytest.mark.parametrize("argv,message", [
    (["--steps", "-5"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1e-3"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--warmup-steps", "-3"], "--warmup-steps"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--loss-chunk-size", "0"], "--loss-chunk-size"),
    (["--betas", "0.9", "1.5"], "--betas"),
    (["--dtype", "fp16"], "--dtype"),
    (["--save-every", "-1"], "--save-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--report-to", "mlflow"], "--report-to"),
])
def test_bad_numbers_are_refused_by_the_command_line(argv, message, tmp_path):
    result = CliRunner().invoke(main, ["train", "--student", "x", "--cache", "y", "--loss", "rkl_topk", "--out",
                                       str(tmp_path / "o"), *argv])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("params,message", [
    ({"steps": -5}, "steps = -5 is invalid; it must be an integer >= 1"),
    ({"lr": 0.0}, "lr = 0.0 is invalid; it must be a number > 0"),
    ({"betas": (0.9, 1.5)}, "betas = .* it must be a number >= 0 and <= 1"),
    ({"dtype": "fp16"}, "'dtype' must be one of fp32, bf16"),
    ({"lr": float("nan")}, "lr = nan is invalid"),
    ({"lora_rank": 8, "zero_stage": 3}, "--zero-stage 2"),
    ({"merge_lora": True}, "--lora-rank"),
    ({"skip_nonfinite": True, "zero_stage": 0}, "--zero-stage 1"),
    ({"report_to": "mlflow"}, "'report_to' must be one of tensorboard, wandb, none"),
])
def test_bad_values_are_refused_for_pipeline_stages_too(params, message):
    with pytest.raises(LopdError, match=message) as err:
        TrainConfig(**params)
    assert "\n" not in str(err.value)


def test_the_trainer_default_of_decoded_shards_is_the_readers():
    from lopd.cache.reader import DEFAULT_MAX_DECODED_SHARDS

    assert TrainConfig().max_decoded_shards == DEFAULT_MAX_DECODED_SHARDS


def test_learning_rate_schedules():
    warm = TrainConfig(warmup_steps=4, lr_schedule="linear")
    assert [lr_factor(warm, 12, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(warm, 12, 8) == pytest.approx(0.5) and lr_factor(warm, 12, 12) == 0.0
    cosine = TrainConfig(lr_schedule="cosine")
    assert lr_factor(cosine, 10, 0) == 1.0 and lr_factor(cosine, 10, 5) == pytest.approx(0.5)
    assert lr_factor(cosine, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(TrainConfig(), 10, s) == 1.0 for s in range(10))
    assert not math.isnan(lr_factor(TrainConfig(lr_schedule="linear"), 1, 0))


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"dtype": "bf16"}, {"grad_checkpointing": True},
                                     {"lora_rank": 4, "merge_lora": True, "grad_checkpointing": True}],
                         ids=["bf16", "grad-checkpointing", "lora"])
def test_precision_and_memory_options_train(options, tmp_path_factory, tmp_path):
    """Each option trains a few finite steps and leaves a model transformers loads (LoRA: the merged one)."""
    from transformers import AutoModelForCausalLM

    from lopd.cache import open_cache
    from lopd.train.trainer import train
    from toy_sets import STUDENT, make_rollout_set, make_score_set, rollout_records

    root = tmp_path_factory.mktemp("options-root")
    cache = open_cache(make_score_set(root, make_rollout_set(root / "rollouts" / "r-options",
                                                             rollout_records([[1, 0], [0, 1], [1, 1], [0, 0]]))).path)
    config = TrainConfig(loss="rkl_topk", steps=3, batch_size=4, lr=1e-3, allow_teacher_mismatch=True,
                         report_to="none", log_every=1, **options)
    result = train(STUDENT, cache, config, tmp_path / "out", quiet=True, root=root)
    assert math.isfinite(result.final_metrics["loss"])
    model = AutoModelForCausalLM.from_pretrained(result.model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if options.get("lora_rank"):
        assert (result.checkpoint / "adapter_config.json").is_file() and result.model == result.checkpoint / "merged"


def test_first_deepspeed_op_build_is_announced_before_it_starts(tmp_path, monkeypatch, capsys):
    """Before: the first `lopd train` on a machine sat silent for minutes while DeepSpeed compiled its CPU
    communication op (deepspeed_shm_comm, in init_distributed). Now one stderr line comes before the build,
    and none once torch's extension directory holds it. Nothing is compiled here."""
    from lopd.train import distributed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as distributed.prepare_environment sets it before the import
    directory = distributed.op_build_directory()
    if directory is None:
        pytest.skip("this accelerator loads no shared-memory op (or DeepSpeed ships it prebuilt)")
    assert directory == tmp_path / "deepspeed_shm_comm"
    distributed.announce_op_build()
    assert capsys.readouterr().err == (f"lopd: DeepSpeed is building its deepspeed_shm_comm op once, into {directory} "
                                       "(a few minutes on a CPU; later runs reuse it) ...\n")
    (directory / "deepspeed_shm_comm.so").write_bytes(b"")  # what the build leaves
    assert distributed.op_build_directory() is None
    distributed.announce_op_build()
    assert capsys.readouterr().err == ""
