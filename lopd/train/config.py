"""`TrainConfig`: every training option, declared once for `lopd train` and pipeline train stages alike.

Each field carries its help text and valid range as dataclass metadata (`option`). The command line builds
its options from these fields (lopd.cli `train_config_options`) and `TrainConfig.__post_init__` enforces the
same ranges for pipeline files, so the two cannot drift apart and a bad value is refused before any model
loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lopd.errors import LopdError
from lopd.limits import check_params

DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
TOKEN_FILTERS = ("none", "aligned")
REPORT_TARGETS = ("tensorboard", "wandb", "none")
DEFAULT_LOSS_CHUNK_SIZE = 512
"""Positions per lm_head chunk (lopd.losses.student): [512, 151,936] float32 is 0.3 GiB; a step holds ~4 such."""


def option(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None, cli: bool = True,
           factory=None):
    """A TrainConfig field with its help text and, for text options, its choices; numeric ranges come from
    lopd.limits.LIMITS under the field's name. cli=False keeps a field out of the generated options (it has a
    hand-written one)."""
    meta = {"help": help, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    loss: str = option("lightning", "Registered loss; see `lopd losses`.", cli=False)
    loss_args: dict[str, Any] = option(help="Loss hyperparameters (`--loss-arg key=value`).", cli=False, factory=dict)
    lr: float = option(1e-4, "Peak learning rate.")
    lr_schedule: str = option("constant", "Learning-rate schedule after warm-up.", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "Linear warm-up steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas (two numbers).")
    max_grad_norm: float = option(1.0, "Gradient-norm clip (0 = off).")
    batch_size: int = option(64, "Sequences per optimizer step, across all ranks.")
    micro_batch_size: int | None = option(None, "Sequences per forward pass per rank (default: batch size / ranks).")
    max_tokens_per_micro_batch: int | None = option(
        None, "Token budget per forward pass (rows x longest sequence): each step's rows are grouped by length into "
        "micro-batches within it, so short rollouts are not padded to the longest; a longer row goes alone.")
    steps: int | None = option(None, "Optimizer steps (default: --epochs passes over the data).")
    epochs: float = option(1.0, "Passes over the data when --steps is not given.")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage.")
    dtype: str = option("fp32", "Weights and activations: bf16 uses DeepSpeed's bf16 mode (fp32 master weights); "
                        "the loss maths is always float32.", choices=DTYPES)
    grad_checkpointing: bool = option(False, "Recompute each layer's activations in backward (less memory, ~30% slower).")
    loss_chunk_size: int = option(DEFAULT_LOSS_CHUNK_SIZE, "Positions per lm_head chunk: the loss never holds more than a "
                                  "few [chunk, vocabulary] tensors.")
    lora_rank: int = option(0, "LoRA rank (0 = train every weight).")
    lora_alpha: float = option(16.0, "LoRA scaling alpha.")
    lora_dropout: float = option(0.0, "LoRA dropout.")
    lora_targets: str = option("all-linear", "Modules LoRA adapts: comma-separated names or all-linear.")
    merge_lora: bool = option(False, "Also save the LoRA-merged full model (loadable by vLLM) beside the adapter.")
    seed: int = option(0, "Seed for data order, dropout and initialisation.")
    log_every: int = option(10, "Steps between metric lines.")
    allow_teacher_mismatch: bool = option(False, "Train OPD from a teacher other than the SFT data's teacher.")
    allow_lineage_mismatch: bool = option(False, "Train on a cache whose rollouts another model generated (off-policy).")
    refresh: dict[str, Any] = option(help="RefreshPolicy fields; empty = never (Lightning OPD).", cli=False, factory=dict)
    token_filter: str = option("none", "aligned: train only on tokens whose teacher-signal gradient is positively "
                               "aligned with the GRPO outcome gradient (needs rewards and --n > 1 rollouts).",
                               choices=TOKEN_FILTERS)
    max_decoded_shards: int = option(8, "Decoded cache shards kept in memory per score set (least recently used "
                                     "evicted first); lopd.cache.reader.DEFAULT_MAX_DECODED_SHARDS.")
    token_filter_signal: str = option("", "Loss whose gradient is the teacher signal for --token-filter "
                                      "(default: the training loss).")
    save_every: int = option(0, "Steps between resumable checkpoints under OUT/checkpoints (0 = only at the end); "
                             "rerunning the same command resumes from the last one.")
    keep_checkpoints: int = option(1, "Resumable checkpoints kept (the oldest are deleted).")
    report_to: str = option("tensorboard", "Where metrics go besides metrics.jsonl: TensorBoard event files in OUT/tb, "
                            "Weights & Biases (WANDB_MODE=offline works without network), or none.",
                            choices=REPORT_TARGETS)
    skip_nonfinite: bool = option(False, "Skip an optimizer step whose loss or gradient norm is NaN/inf (counted as "
                                  "nonfinite_skipped in the metrics) instead of stopping with an error.")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise LopdError(f"train option {f.name!r} must be one of {', '.join(choices)}, "
                                f"got {getattr(self, f.name)!r}")
        check_params({f.name: getattr(self, f.name) for f in fields(self)}, "train option")
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
