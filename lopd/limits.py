"""The valid range of every numeric stage option, declared once.

The command line's click types and the pipeline-file check both come from this table, so a number that makes
no sense (`--rows-per-shard 0`, `--steps -5`, `--top-p 1.5`) is refused with one line before any engine
starts, however it was given, instead of surfacing as a vLLM traceback, a DeepSpeed assert or, worse, a run
that exits 0 having silently done something else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import click

from lopd.errors import LopdError


@dataclass(frozen=True)
class Limit:
    kind: type  # int or float
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # the bound itself is excluded
    max_open: bool = False

    def click_type(self) -> click.ParamType:
        range_type = click.IntRange if self.kind is int else click.FloatRange
        return range_type(min=self.min, max=self.max, min_open=self.min_open, max_open=self.max_open)

    def describe(self) -> str:
        low = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min}"
        high = "" if self.max is None else f"{'<' if self.max_open else '<='} {self.max}"
        return f"{'an integer' if self.kind is int else 'a number'} {' and '.join(p for p in (low, high) if p)}".strip()

    def accepts(self, value: Any) -> bool:
        numeric = isinstance(value, int) if self.kind is int else isinstance(value, (int, float))
        if not numeric or isinstance(value, bool) or not math.isfinite(value):
            return False
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return False
        return self.max is None or (value < self.max if self.max_open else value <= self.max)


LIMITS: dict[str, Limit] = {
    # rollout / eval sampling
    "n": Limit(int, 1),
    "temperature": Limit(float, 0),
    "top_p": Limit(float, 0, 1, min_open=True),
    "max_tokens": Limit(int, 1),
    # score
    "k": Limit(int, 1),
    "max_batch_tokens": Limit(int, 1),
    "rows_per_shard": Limit(int, 1),
    "context_slice": Limit(int, 0),
    "max_logprobs": Limit(int, 1),
    # train
    "lr": Limit(float, 0, min_open=True),
    "batch_size": Limit(int, 1),
    "micro_batch_size": Limit(int, 1),
    "max_tokens_per_micro_batch": Limit(int, 1),
    "steps": Limit(int, 1),
    "epochs": Limit(float, 0, min_open=True),
    "warmup_steps": Limit(int, 0),
    "weight_decay": Limit(float, 0),
    "max_grad_norm": Limit(float, 0),
    "log_every": Limit(int, 1),
    "zero_stage": Limit(int, 0, 3),
    "max_decoded_shards": Limit(int, 1),
    "betas": Limit(float, 0, 1),  # each of the two
    "loss_chunk_size": Limit(int, 1),
    "lora_rank": Limit(int, 0),
    "lora_alpha": Limit(float, 0, min_open=True),
    "lora_dropout": Limit(float, 0, 1, max_open=True),
    "save_every": Limit(int, 0),
    "keep_checkpoints": Limit(int, 1),
    # diagnostics
    "rows": Limit(int, 1),
}


def option_type(name: str) -> click.ParamType:
    """The click type of the option whose parameter is `name` (e.g. "rows_per_shard" for --rows-per-shard)."""
    return LIMITS[name].click_type()


def check_params(params: dict[str, Any], where: str) -> None:
    """Refuse the first parameter outside its range (None means "the default" and passes; a list or tuple, such as
    `betas`, is checked element by element)."""
    for name, value in params.items():
        limit = LIMITS.get(name)
        if limit is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if not limit.accepts(item):
                raise LopdError(f"{where}: {name} = {value!r} is invalid; it must be {limit.describe()}")
