"""The environment of a child `lopd` process a test starts (tests/test_train_resume.py, tests/test_cache_bucket.py)."""
from __future__ import annotations

import os

# A train() earlier in this pytest process (another test module) leaves a one-process launcher's RANK/MASTER_PORT in
# os.environ while its process group still holds that port: a child must pick its own.
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def subprocess_env() -> dict[str, str]:
    """This process's environment for a child `lopd train`: no crash point, no inherited launcher variables."""
    return {k: v for k, v in os.environ.items() if k != "LOPD_CRASH_AT" and k not in LAUNCHER_VARS}
