"""Run a job's command and sample its process tree while it runs: the memory measures of `make bench` and
`make scale` share this loop (each brings its own sample)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable


def sample_while_running(cmd: list[str], env: dict[str, str], log_path: Path, sample: Callable[[Any], None],
                         interval: float = 0.2, timeout: float = 600) -> float:
    """Run `cmd` (output to `log_path`), calling `sample(its psutil.Process)` every `interval` seconds until it
    exits; its seconds. Raises if it fails or outlives `timeout`."""
    import psutil

    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"{' '.join(cmd)} still running after {timeout}s")
                try:
                    sample(ps)
                except psutil.NoSuchProcess:
                    break
                time.sleep(interval)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; log {log_path}:\n{tail}")
    return time.perf_counter() - t0
