"""A throwaway S3-compatible server (moto, server mode) on 127.0.0.1, for tests and the benchmark.

    with LoopbackS3() as s3:            # a free port; stopped by pid on exit
        s3.create_bucket("bench")
        Storage(StorageSection(endpoint_url=s3.endpoint))

Needs the `test` extra (moto[server], boto3). The server keeps objects in its own memory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from pipeline.cluster import free_loopback_port as free_port

FAKE_KEY_ID = "AKIATESTFAKEKEY00001"
FAKE_SECRET = "fakeSecretDoNotLog/8f3b2c1d9e7a6b5c4d3e2f1a"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
}


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class LoopbackS3:
    """moto's S3 server as a subprocess; `start()` also points this process's AWS env at fake credentials,
    so Ray workers started afterwards inherit them."""

    def __init__(self, port: Optional[int] = None, log_dir: Optional[str] = None):
        self.port = port or free_port()
        self.log_path = Path(log_dir or os.environ.get("TMPDIR", tempfile.gettempdir())) / f"moto-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackS3":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise
        os.environ.update(FAKE_AWS_ENV)
        os.environ.pop("AWS_PROFILE", None)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
            self._log.close()

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)

    def __enter__(self) -> "LoopbackS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
