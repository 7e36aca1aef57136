"""Connecting to Ray: a local cluster for laptops and CI, the existing one under `ray job submit`."""

from __future__ import annotations

import logging
import os
from typing import Optional


def connect(num_cpus: Optional[int] = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one.

    Under `ray job submit`, `ray.init(num_cpus=...)` raises, so only a plain `ray.init()` is used there.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return
    # Bind loopback for a local cluster (Ray otherwise binds the machine's interface address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
