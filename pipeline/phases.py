"""Seconds per phase of a job (checks, ray_start, prepare, training, ...): where a run's time went."""

from __future__ import annotations

import time


class Lap:
    """Records the seconds since the previous lap under a phase name."""

    def __init__(self, into: dict[str, float]):
        self.into, self.t = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(now - self.t, 3)
        self.t = now
