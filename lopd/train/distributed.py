"""DeepSpeed process-group set-up that works under a launcher (deepspeed/torchrun) and without one."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path


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
        announce_op_build()
        # DeepSpeed prints "... built successfully" on stdout as it loads its CPU communication op; lopd's stdout is
        # the command's JSON result (`lopd train | jq`), so its chatter goes to stderr with the rest of the logs.
        with contextlib.redirect_stdout(sys.stderr):
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return deepspeed


def op_build_directory(class_name: str = "ShareMemCommBuilder") -> Path | None:
    """Where DeepSpeed is about to compile the op `class_name` (its builder), or None when it will not: the
    accelerator has no such op, it is incompatible here, DeepSpeed ships it prebuilt, or torch's extension
    directory already holds the build. On the CPU accelerator `init_distributed` loads the shared-memory
    communication op (deepspeed_shm_comm) this way, and its first build takes minutes. Mirrors
    deepspeed.comm.torch.build_shm_op and OpBuilder.load; any API it cannot read counts as "no build"."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder(class_name)
        if builder is None or installed_ops.get(builder.name) or not deepspeed.ops.__compatible_ops__.get(builder.NAME):
            return None
        directory = Path(_get_build_directory(builder.name, verbose=False))
        return None if (directory / f"{builder.name}.so").is_file() else directory
    except (ImportError, AttributeError):
        return None


def announce_op_build() -> None:
    """One stderr line before a first op build, so minutes of silence do not look like a hang (local rank 0 says
    it once per machine; the other ranks wait on torch's build lock)."""
    directory = op_build_directory()
    if directory is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"lopd: DeepSpeed is building its {directory.name} op once, into {directory} (a few minutes on a "
              "CPU; later runs reuse it) ...", file=sys.stderr, flush=True)


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
