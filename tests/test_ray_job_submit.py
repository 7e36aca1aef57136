"""`ray job submit` against a real head started with `ray start --head` on loopback.

The head is started from this venv (PATH puts .venv/bin first), so the job's `python` has the project's
dependencies, as a cluster node built from infra/Dockerfile does. Every port is a free one picked here:
the machine may run other Ray clusters. The head is stopped at the end by the pids of its own temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageSection
from pipeline.sample import write_sample
from pipeline.storage import Storage
from tests.conftest import ROOT, free_port, wait_for_port

pytestmark = pytest.mark.integration
RAY = str(ROOT / ".venv" / "bin" / "ray")


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                # explicit: `ray start` turns token auth on by itself once ~/.ray/auth_token exists
                "RAY_AUTH_MODE": "disabled"})
    return env


@pytest.fixture(scope="module")
def ray_head():
    # a short temp dir: Ray's unix sockets live under it and socket paths are limited to ~107 bytes
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    cmd = [RAY, "start", "--head", "--num-cpus", "4", "--dashboard-host", "127.0.0.1", "--node-ip-address",
           "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats", "--include-dashboard", "true"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    env = ray_env()
    start = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-3000:]
    try:
        wait_for_port(dash, timeout=120)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _pids_under(temp_dir: str) -> set[int]:
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if temp_dir in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(p.name))
            except OSError:
                pass
    return pids


def stop_head(temp_dir: str) -> None:
    """Stop this head's processes by pid: `ray stop` would stop every Ray cluster on the machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_under(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while _pids_under(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


def submit(address: str, env: dict[str, str], *entrypoint: str, timeout: float = 900) -> tuple[str, subprocess.CompletedProcess]:
    sid = f"test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", sid,
                           "--runtime-env", "infra/runtime_env.yaml", "--working-dir", ".", "--", *entrypoint],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return sid, proc


def status(address: str, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(address).get_job_status(sid).value)


def test_job_submit_uploads_a_small_working_dir(ray_head):
    address, env = ray_head
    sid, p = submit(address, env, "python", "-c", "import json, os; print('LISTING', json.dumps(sorted(os.listdir('.'))))")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    listing = json.loads(p.stdout.split("LISTING ", 1)[1].splitlines()[0])
    assert {"pipeline", "jobs", "pyproject.toml"} <= set(listing)
    assert not {".git", ".venv", ".venv-feast", "data", "artifacts", "output", "infra"} & set(listing)
    assert status(address, sid) == "SUCCEEDED"


def test_pipeline_runs_under_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    write_sample(str(tmp_path / "data"), Storage(StorageSection()), rows=2000, shards=2, features=8, seed=5)
    sets = [f"data.input={tmp_path / 'data'}", f"artifacts.uri={tmp_path / 'artifacts'}",
            f"output.uri={tmp_path / 'output'}", "run.name=submitted", "train.epochs=2", "model.hidden_dims=[16]",
            "model.latent_dim=3"]
    args = ["python", "-m", "jobs.run", "--config", "jobs/configs/demo.yaml", "--run-date", "2026-01-02"]
    for s in sets:
        args += ["--set", s]
    sid, p = submit(address, env, *args)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert status(address, sid) == "SUCCEEDED", out[-2000:]
    assert "== summary ==" in out and "rows scored      2000 of 2000" in out
    part = tmp_path / "output" / "run_date=2026-01-02"
    assert (part / "_SUCCESS").exists() and pq.read_table(part).num_rows == 2000
    assert (tmp_path / "artifacts" / "submitted" / "report.html").exists()

    # the nightly form: score with the latest stored model, no training
    sid2, p2 = submit(address, env, "python", "-m", "jobs.run", "--config", "jobs/configs/demo.yaml", "--model", "latest",
                      "--run-date", "2026-01-03", *[a for s in sets for a in ("--set", s)])
    out2 = p2.stdout + p2.stderr
    assert p2.returncode == 0, out2[-4000:]
    assert status(address, sid2) == "SUCCEEDED"
    assert "[train]" not in out2 and "with submitted@" in out2
    assert pq.read_table(tmp_path / "output" / "run_date=2026-01-03").num_rows == 2000
