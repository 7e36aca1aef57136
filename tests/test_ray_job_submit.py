"""`ray job submit` against a real head started with `ray start --head` on loopback.

The head is started from this venv (PATH puts .venv/bin first), so the job's `python` has the project's
dependencies, as a cluster node built from infra/Dockerfile does. Every port is a free one picked here:
the machine may run other Ray clusters. The head is stopped at the end by the pids of its own temp dir.
"""

from __future__ import annotations

import json
import os
import re
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
from tests.procs import ROOT, free_port, wait_for_port

# Each test may wait on a whole training job; on a loaded 2-core CI box that can pass 10 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]
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
    """Stop this head's processes by pid: `ray stop` would stop every Ray cluster on the machine. A few
    seconds' grace after SIGTERM (some of them wait out their own shutdown timeouts), then SIGKILL."""
    for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in _pids_under(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while _pids_under(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


def submit(address: str, env: dict[str, str], *entrypoint: str, timeout: float = 1400) -> tuple[str, subprocess.CompletedProcess]:
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


@pytest.fixture(scope="module")
def submitted(ray_head, tmp_path_factory):
    """Train and score through `ray job submit` once; the tests below look at the result."""
    address, env = ray_head
    tmp = tmp_path_factory.mktemp("submitted")
    write_sample(str(tmp / "data"), Storage(StorageSection()), rows=1500, shards=2, features=8, seed=5)
    sets = [f"data.input={tmp / 'data'}", f"artifacts.uri={tmp / 'artifacts'}", f"output.uri={tmp / 'output'}",
            "run.name=submitted", "train.epochs=2", "train.num_workers=1", "model.hidden_dims=[16]",
            "model.latent_dim=3"]
    overrides = [a for s in sets for a in ("--set", s)]
    sid, p = submit(address, env, "python", "-m", "jobs.run", "--config", "jobs/configs/tiny.yaml",
                    "--run-date", "2026-01-02", *overrides)
    return {"address": address, "env": env, "tmp": tmp, "overrides": overrides, "sid": sid, "proc": p}


def test_pipeline_trains_and_scores_under_ray_job_submit(submitted):
    p, tmp = submitted["proc"], submitted["tmp"]
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert status(submitted["address"], submitted["sid"]) == "SUCCEEDED", out[-2000:]
    assert "== summary ==" in out and "rows scored      1500 of 1500" in out
    # progress reaches the submitter: epoch lines with losses, throughput and ETA (the last epoch always prints)
    assert re.search(r"\[train\] epoch 2/2 train_loss=\S+ val_loss=\S+ .* rows/s .* eta=\d+s", out), out[-3000:]
    part = tmp / "output" / "run_date=2026-01-02"
    assert (part / "_SUCCESS").exists() and pq.read_table(part).num_rows == 1500
    assert (tmp / "artifacts" / "submitted" / "report.html").exists()


def test_nightly_scoring_with_the_latest_model_under_ray_job_submit(submitted):
    """The nightly form: score with the latest stored model, no training."""
    assert submitted["proc"].returncode == 0, "the training job failed (see the test above)"
    address, env = submitted["address"], submitted["env"]
    sid, p = submit(address, env, "python", "-m", "jobs.run", "--config", "jobs/configs/tiny.yaml", "--model",
                    "latest", "--run-date", "2026-01-03", *submitted["overrides"])
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert status(address, sid) == "SUCCEEDED"
    assert "[train]" not in out and "with submitted@" in out
    assert pq.read_table(submitted["tmp"] / "output" / "run_date=2026-01-03").num_rows == 1500
