"""Child `lopd` processes a test starts: their environment, and waiting for them (tests/test_train_resume.py,
tests/test_cache_bucket.py, tests/test_score_bucket.py, tests/test_score_crash_safety.py, tests/test_docs_walkthrough.py)."""
from __future__ import annotations

import os
import signal
import subprocess

# A train() earlier in this pytest process (another test module) leaves a one-process launcher's RANK/MASTER_PORT in
# os.environ while its process group still holds that port: a child must pick its own.
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def subprocess_env() -> dict[str, str]:
    """This process's environment for a child `lopd train`: no crash point, no inherited launcher variables."""
    return {k: v for k, v in os.environ.items() if k != "LOPD_CRASH_AT" and k not in LAUNCHER_VARS}


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    """Wait for a child started with `start_new_session=True`, then kill whatever it left in its session (orphaned
    engine processes); its exit code."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
