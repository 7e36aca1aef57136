"""Shared fixtures: a real S3-compatible server (moto, server mode) on loopback, a real local Ray, headless
Chromium; and the test tiers.

The S3 server is a subprocess on a free 127.0.0.1 port, stopped by pid at the end of the session. Ray is
started after it, so its workers inherit the (fake) AWS credentials from the environment.

Tiers (markers are set here from what a test uses, so they cannot be forgotten):
  integration   uses the S3 server or a Ray cluster (the fixtures below, directly or through another
                fixture), or marked by hand when it runs a job in a subprocess or starts Ray itself
  browser       renders a page in headless Chromium (the `render_page` fixture)
  unit          the rest: `make test-unit` (`pytest --unit`) runs only these, and there a test that starts
                Ray, the S3 server, a job subprocess or Chromium fails at once, naming what it started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.loopback_s3 import LoopbackS3

# Local Ray binds 127.0.0.1; no usage stats leave the machine.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

# A test using one of these fixtures (they appear in `item.fixturenames` through other fixtures too) needs the
# S3 server or a Ray cluster: it is an integration test.
INTEGRATION_FIXTURES = {"s3_server", "bucket", "ray_cluster", "ray_address", "storage", "trained_model"}
BROWSER_FIXTURES = {"render_page"}
_UNIT_TIER = False


def pytest_addoption(parser):
    parser.addoption("--unit", action="store_true",
                     help="run only unit tests (no Ray, S3 server, job subprocess or browser); one that starts "
                          "any of them fails")


def pytest_configure(config):
    global _UNIT_TIER
    _UNIT_TIER = config.getoption("--unit")
    if _UNIT_TIER:
        import ray
        import ray._private.worker

        def refuse_ray(*args, **kwargs):
            unit_tier_refuses("a Ray cluster (ray.init)")

        # Ray Data and Ray Train start a cluster through ray.init as well (auto-init), so this catches them too
        ray.init = ray._private.worker.init = refuse_ray


def unit_tier_refuses(what: str) -> None:
    if _UNIT_TIER:
        # pytest.fail raises a BaseException: no `except Exception` in the code under test swallows it
        pytest.fail(f"unit tier: this test started {what}; mark it @pytest.mark.integration "
                    "(or use the s3_server/ray_cluster fixtures, which mark it)", pytrace=False)


LONGEST_FILES = ["test_multinode.py", "test_model_kinds_e2e.py", "test_faults.py", "test_hangs.py",
                 "test_benchmark.py", "test_tracking.py", "test_end_to_end.py", "test_ray_job_submit.py",
                 "test_operations.py"]
"""Test files of a minute or more, longest first: they start first, so that `make test`'s processes (whole
files each) do not end with one of them running alone (measured with --durations on the 2-core box)."""


SHARED_MODEL_FILES = ["test_faults.py", "test_hangs.py", "test_input_checks.py", "test_artifacts.py"]
"""Test files that use the session model `trained_model("s3-vector")`: `make test` (`--dist loadfile`) runs
them in one pytest process (one unit of work, `pytest_xdist_make_scheduler` below), so the model is trained
once, not once in each process. Every other file is a unit of its own."""


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the files in SHARED_MODEL_FILES as one unit of work."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedModelFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "shared-model-files" if Path(path).name in SHARED_MODEL_FILES else path

    return SharedModelFiles(config, log)


def _longest_first(item) -> int:
    name = item.path.name
    return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_longest_first)  # stable: each file keeps its own order
    for item in items:
        names = set(item.fixturenames)
        if names & INTEGRATION_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if names & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
    if _UNIT_TIER:
        slow = [i for i in items if i.get_closest_marker("integration") or i.get_closest_marker("browser")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [i for i in items if i not in set(slow)]


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on loopback; AWS env points at fake credentials for the session."""
    unit_tier_refuses("the loopback S3 server")
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
    """A real local Ray cluster for the session (4 logical CPUs on the 2-core box: fractional workers), shared
    by every in-process test; a test that kills Ray or needs an exact CPU count starts a job with its own.
    Yields the cluster's temp dir (its session logs are under `session_*/logs/`).

    Started the way a job starts its own local Ray (pipeline/cluster.py: idle workers kept, Ray Train's
    faster health check), in a temp dir of its own so that no other Ray on the machine shares its files."""
    import ray

    from pipeline.cluster import start_local

    temp_dir = tempfile.mkdtemp(prefix="sess-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    start_local(4, log_to_driver=True, _temp_dir=temp_dir)
    yield temp_dir
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """The session cluster's address: a job subprocess given it as RAY_ADDRESS joins this cluster, as under
    `ray job submit`, instead of starting a local Ray of its own."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def trained_model(ray_cluster, s3_server, tmp_path_factory):
    """`trained_model(name) -> TrainedModel`: the model of configuration `name` in tests/models.py, trained
    on the session's Ray the first time a test asks for it; every later test gets the same one (read-only)."""
    from tests.models import MODELS

    done = {}

    def get(name: str):
        if name not in done:
            done[name] = MODELS[name](s3_server, tmp_path_factory)
        return done[name]

    return get


@pytest.fixture
def storage(s3_server):
    from pipeline.config import StorageSection
    from pipeline.storage import Storage

    return Storage(StorageSection(endpoint_url=s3_server))


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--allow-file-access-from-files"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium on PATH: install it (apt-get install -y chromium); .ci/run does this")


@pytest.fixture
def render_page(tmp_path):
    """`render_page(page) -> dict`: load `page` in headless Chromium and return the render-check marker's
    attributes and text (see tests/test_report.py)."""
    unit_tier_refuses("Chromium")

    def render(page: Path) -> dict[str, str]:
        profile = tmp_path / f"profile-{page.stem}-{uuid.uuid4().hex[:6]}"
        profile.mkdir()
        proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        m = re.search(r'<p id="render-check"([^>]*)>([^<]*)</p>', proc.stdout)
        assert m, f"no render-check marker in the dumped DOM:\n{proc.stdout[:500]}"
        attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(1)))
        attrs["text"] = m.group(2)
        return attrs

    return render
