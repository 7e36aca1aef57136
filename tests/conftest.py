"""Shared fixtures: a real S3-compatible server (moto, server mode) on loopback and a real local Ray.

The S3 server is a subprocess on a free 127.0.0.1 port, stopped by pid at the end of the session. Ray is
started after it, so its workers inherit the (fake) AWS credentials from the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.loopback_s3 import FAKE_KEY_ID, FAKE_SECRET, LoopbackS3, free_port, wait_for_port  # noqa: F401

# Local Ray binds 127.0.0.1; no usage stats leave the machine.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on loopback; AWS env points at fake credentials for the session."""
    with LoopbackS3() as server:
        yield server.endpoint


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray cluster for the session (4 logical CPUs on the 2-core box: fractional workers)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture
def storage(s3_server):
    from pipeline.config import StorageSection
    from pipeline.storage import Storage

    return Storage(StorageSection(endpoint_url=s3_server))


def job_env(s3_server: str | None = None) -> dict[str, str]:
    """Environment for running a job entrypoint as a subprocess (its own local Ray)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("RAY_ADDRESS", None)
    if s3_server:
        env["AWS_ENDPOINT_URL"] = s3_server
    return env


def run_job(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env or job_env(), timeout=timeout, cwd=cwd or ROOT)
