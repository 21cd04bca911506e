"""Where each metrics row goes besides metrics.jsonl: TensorBoard event files (default) or Weights & Biases.

Only rank 0 reports. A resumed run continues the same curves: TensorBoard drops the events a killed attempt
wrote after the checkpoint it resumes from (`purge_step`; a fresh run drops all earlier events in OUT/tb), and
W&B resumes the run whose id the checkpoint carries (a fresh run gets a new one). Offline W&B
(WANDB_MODE=offline) writes under OUT/wandb and needs no network.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lopd.errors import LopdError
from lopd.train.config import TrainConfig

TENSORBOARD_DIR = "tb"


class Reporter:
    """`log(step, row)` sends a metrics row's finite numbers to the configured target; `close()` flushes it."""

    def __init__(self, target: str, out_dir: Path, config: TrainConfig, run_id: str, resumed_step: int = 0):
        self.writer = None
        self.run = None
        if target == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=resumed_step + 1)
        elif target == "wandb":
            try:
                import wandb
            except ImportError:
                raise LopdError("--report-to wandb needs the wandb package: pip install 'lopd[wandb]' "
                                "(or pass --report-to tensorboard)") from None
            self.run = wandb.init(project="lopd", name=out_dir.name, id=run_id, resume="allow", dir=str(out_dir),
                                  config=asdict(config))

    def log(self, step: int, row: dict[str, Any]) -> None:
        scalars = {key: float(value) for key, value in row.items()
                   if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log({f"train/{key}": value for key, value in scalars.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
