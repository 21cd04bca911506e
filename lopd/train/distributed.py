"""DeepSpeed process-group set-up that works under a launcher (deepspeed/torchrun) and without one."""
from __future__ import annotations

import os
import socket


def prepare_environment() -> None:
    """Select the CPU accelerator when there is no GPU, and fake a one-process launcher when none ran.

    Must run before `import deepspeed`: DeepSpeed picks its accelerator at import time, and without
    RANK/WORLD_SIZE it falls back to MPI discovery (and fails on a missing mpi4py).
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group():
    """Initialise torch.distributed once per process (gloo on CPU, nccl on GPU); returns the deepspeed module."""
    prepare_environment()
    import deepspeed
    import torch

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return deepspeed


def rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    import torch

    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def max_over_ranks(value: int) -> int:
    """The largest `value` any rank holds (one all-reduce; the value itself on a single process)."""
    import torch

    if world_size() == 1:
        return value
    tensor = torch.tensor([value], device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())
