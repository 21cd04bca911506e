"""`TrainConfig`: every training option, declared once for `lopd train` and pipeline train stages alike.

Each field carries its help text and valid range as dataclass metadata (`option`). The command line builds
its options from these fields (lopd.cli `train_config_options`) and `TrainConfig.__post_init__` enforces the
same ranges for pipeline files, so the two cannot drift apart and a bad value is refused before any model
loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from lopd.errors import LopdError

DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TOKEN_FILTERS = ("none", "aligned")
REPORT_TARGETS = ("tensorboard", "wandb", "none")
DEFAULT_LOSS_CHUNK_SIZE = 1024
"""Positions per lm_head chunk (lopd.losses.student): [1024, 151,936] float32 is 0.6 GiB; backward holds ~3."""


def option(default: Any = None, help: str = "", *, low: float | None = None, high: float | None = None,
           low_open: bool = False, choices: tuple[str, ...] | None = None, cli: bool = True, factory=None):
    """A TrainConfig field with its help and range: [low, high] (low excluded when low_open); None is always allowed
    for optional fields. cli=False keeps a field out of the generated options (it has a hand-written one)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    loss: str = option("lightning", "Registered loss; see `lopd losses`.", cli=False)
    loss_args: dict[str, Any] = option(help="Loss hyperparameters (`--loss-arg key=value`).", cli=False, factory=dict)
    lr: float = option(1e-4, "Peak learning rate.", low=0.0, low_open=True)
    lr_schedule: str = option("constant", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up steps.", low=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", low=0.0)
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas (two numbers).", low=0.0, high=1.0)
    max_grad_norm: float = option(1.0, "Gradient-norm clip (0 = off).", low=0.0)
    batch_size: int = option(64, "Sequences per optimizer step, across all ranks.", low=1)
    micro_batch_size: int | None = option(None, "Sequences per forward pass per rank (default: batch size / ranks).", low=1)
    steps: int | None = option(None, "Optimizer steps (default: --epochs passes over the data).", low=1)
    epochs: float = option(1.0, "Passes over the data when --steps is not given.", low=0.0, low_open=True)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage.", low=0, high=3)
    dtype: str = option("fp32", "Weights and activations: bf16 uses DeepSpeed's bf16 mode (fp32 master weights); "
                        "the loss maths is always float32.", choices=DTYPES)
    grad_checkpointing: bool = option(False, "Recompute each layer's activations in backward (less memory, ~30% slower).")
    loss_chunk_size: int = option(DEFAULT_LOSS_CHUNK_SIZE, "Positions per lm_head chunk: the loss never holds more than a "
                                  "few [chunk, vocabulary] tensors.", low=1)
    lora_rank: int = option(0, "LoRA rank (0 = train every weight).", low=0)
    lora_alpha: float = option(16.0, "LoRA scaling alpha.", low=0.0, low_open=True)
    lora_dropout: float = option(0.0, "LoRA dropout.", low=0.0, high=1.0)
    lora_targets: str = option("all-linear", "Modules LoRA adapts: comma-separated names or all-linear.")
    merge_lora: bool = option(False, "Also save the LoRA-merged full model (loadable by vLLM) beside the adapter.")
    seed: int = option(0, "Seed for data order, dropout and initialisation.")
    log_every: int = option(10, "Steps between metric lines.", low=1)
    allow_teacher_mismatch: bool = option(False, "Train OPD from a teacher other than the SFT data's teacher.")
    allow_lineage_mismatch: bool = option(False, "Train on a cache whose rollouts another model generated (off-policy).")
    refresh: dict[str, Any] = option(help="RefreshPolicy fields; empty = never (Lightning OPD).", cli=False, factory=dict)
    token_filter: str = option("none", "aligned: train only on tokens whose teacher-signal gradient is positively "
                               "aligned with the GRPO outcome gradient (needs rewards and --n > 1 rollouts).",
                               choices=TOKEN_FILTERS)
    token_filter_signal: str = option("", "Loss whose gradient is the teacher signal for --token-filter "
                                      "(default: the training loss).")
    save_every: int = option(0, "Steps between resumable checkpoints under OUT/checkpoints (0 = only at the end); "
                             "rerunning the same command resumes from the last one.", low=0)
    keep_checkpoints: int = option(1, "Resumable checkpoints kept (the oldest are deleted).", low=1)
    report_to: str = option("tensorboard", "Where metrics go besides metrics.jsonl: TensorBoard event files in OUT/tb, "
                            "Weights & Biases (WANDB_MODE=offline works without network), or none.",
                            choices=REPORT_TARGETS)
    skip_nonfinite: bool = option(False, "Skip an optimizer step whose loss or gradient norm is NaN/inf (counted as "
                                  "nonfinite_skipped in the metrics) instead of stopping with an error.")

    def __post_init__(self) -> None:
        for f in fields(self):
            check_value(f.name, getattr(self, f.name), f.metadata)
        if self.lora_rank and self.zero_stage == 3:
            raise LopdError("LoRA trains with ZeRO stage 0-2 (the adapters are small; ZeRO-3 buys nothing): "
                            "pass --zero-stage 2")
        if self.merge_lora and not self.lora_rank:
            raise LopdError("--merge-lora needs a LoRA run (--lora-rank R)")
        if self.skip_nonfinite and self.zero_stage == 0 and not self.bf16:
            raise LopdError("--skip-nonfinite needs DeepSpeed's overflow check, which ZeRO stage 0 in fp32 lacks: "
                            "pass --zero-stage 1 or higher")

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"


def check_value(name: str, value: Any, meta) -> None:
    """One-line LopdError when `value` is outside the field's declared choices or range."""
    if value is None or not meta:
        return
    where = f"train option {name!r}"
    if meta["choices"] is not None and value not in meta["choices"]:
        raise LopdError(f"{where} must be one of {', '.join(meta['choices'])}, got {value!r}")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise LopdError(f"{where} must be a finite number, got {item!r}")
        below = item <= low if meta["low_open"] else item < low if low is not None else False
        if below or (high is not None and item > high):
            bound = ">" if meta["low_open"] else ">="
            span = f"{bound} {low}" if high is None else f"in [{low}, {high}]"
            raise LopdError(f"{where} must be {span}, got {item!r}")
