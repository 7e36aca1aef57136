"""A real `mlflow server` on a free loopback port: SQLite backend store and artifacts in a temporary folder
(served through the server, as in production). It runs from its own virtualenv (`make mlflow-env`: full
MLflow pins pyarrow<26), started as a subprocess in its own session and stopped by its pid (its process
group: the server runs its web workers as children)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

from tests.loopback_s3 import free_port

MLFLOW_SERVER = Path(__file__).resolve().parents[1] / ".venv-mlflow" / "bin" / "mlflow"
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""MLflow 3's server starts a job runner by default (a runner process and a pool of huey consumers, each a
Python importing MLflow, polling): an idle server with it used 13 CPU-seconds every 30 s on the 2-core
machine, and none without it. The tracking and registry calls the pipeline makes need no server jobs."""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class LoopbackMlflow:
    def __init__(self, root: Path, port: Optional[int] = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "LoopbackMlflow":
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.root / f"mlflow-server-{self.port}.log", "w")
        if not MLFLOW_SERVER.exists():
            raise RuntimeError(f"no {MLFLOW_SERVER}: run `make mlflow-env` (the server's own virtualenv)")
        self.proc = subprocess.Popen(
            [str(MLFLOW_SERVER), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **SERVER_ENV})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mlflow server exited at start; see {self._log.name}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not answering on {self.uri} after {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # its own session: the group id is its pid
        # SIGTERM first (uvicorn's worker can take ~15 s to drain; a few seconds are enough for the tests)
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 15)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait_s
            while time.time() < deadline and _group_alive(pgid):
                self.proc.poll()  # reaps the leader, so the group empties
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        self.proc.wait(timeout=15)
        self.proc = None
        self._log.close()

    def log_text(self) -> str:
        return (self.root / f"mlflow-server-{self.port}.log").read_text(errors="replace")

    def __enter__(self) -> "LoopbackMlflow":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
