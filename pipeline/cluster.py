"""Connecting to Ray: a local cluster for laptops and CI, the existing one under `ray job submit`; and how
much of Ray's own logging a person sees.

By default a job's terminal shows the job's own lines, Ray Data's progress bars and real warnings and
errors. Ray's info-level chatter (Ray Data's execution plan per dataset, Ray Train's per-report and
per-checkpoint lines with full paths) goes only to Ray's session logs (`/tmp/ray/session_latest/logs/`);
`--verbose` (`set_verbose(True)`) shows it in the terminal too.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Optional

_VERBOSE = [False]


def set_verbose(verbose: bool) -> None:
    """Show Ray's, Ray Data's and Ray Train's info-level logs in the terminal (the entrypoints' --verbose)."""
    _VERBOSE[0] = verbose


def verbose() -> bool:
    return _VERBOSE[0]


def ray_log_level() -> str:
    """Level of Ray's own loggers on the console: INFO with --verbose, else WARNING."""
    return "INFO" if verbose() else "WARNING"


class _RayDataConsole(logging.Filter):
    """On Ray Data's console handler: its progress and warnings pass; its info-level notes (Parquet encoding
    ratio estimates, reader batch sizes, ...) stay in its session log file (`ray-data.log`), which has its own
    handler. With --verbose everything passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (verbose() or record.levelno >= logging.WARNING
                or record.name.startswith("ray.data._internal.progress")
                or record.name.endswith("streaming_executor") and "execution finished" in record.getMessage())


def _quiet_ray_libraries() -> None:
    """Set, before any dataset or trainer exists (they copy these settings when made), what Ray Data and Ray
    Train print on the driver's console."""
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if "SessionFileHandler" not in type(handler).__name__ and not any(
                isinstance(f, _RayDataConsole) for f in handler.filters):
            handler.addFilter(_RayDataConsole())
    # Ray Data logs "Starting execution of Dataset ..." and the whole execution plan at INFO for every
    # dataset it runs (each epoch's split, the validation pass, scoring): --verbose only.
    ray.data.DataContext.get_current().print_on_execution_start = verbose()
    # Ray Train (V2) replaces print() in train workers by one that writes the line to stdout *and* logs it
    # to its console handler, so every line a worker prints appears twice. Without the patch a print is a
    # plain print (Ray forwards it to the driver once). Ray Train hands this variable on to its controller
    # and workers, also under `ray job submit`.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train's preemption watcher actor only feeds `ray.train.get_preemption_info()`, which the training
    # loop does not read (a lost node is a worker failure: train.max_failures restarts from the checkpoint).
    # Creating it makes Ray's core worker log an error-level "E ... core_worker.cc: Actor ... has constructor
    # arguments in the object store" per run, which reads like a failure. Also handed on by Ray Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _quiet_train_worker(log_level: str, loop: Callable[[dict], None], config: dict) -> None:
    # Ray Train 2.60 logs "Reporting training result ..." per report from a logger named by its file path,
    # not under `ray.train`, so RunConfig's LoggingConfig (which sets `ray.train.*`) misses it: give Ray
    # Train's loggers of that kind the same level, here in the worker process, before the loop runs.
    import ray.train

    train_dir = os.path.dirname(ray.train.__file__)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(train_dir):
            logging.getLogger(name).setLevel(log_level)
    loop(config)


def train_loop_with_ray_log_level(loop: Callable[[dict], None]) -> Callable[[dict], None]:
    """`loop` for TorchTrainer, run in each worker with Ray Train's info logs at `ray_log_level()`."""
    return functools.partial(_quiet_train_worker, ray_log_level(), loop)


def torch_trainer_class() -> type:
    """Ray Train's TorchTrainer without two of its default callbacks where they do nothing but start a process
    each run:

    - the placement group cleaner, on a cluster that has no dashboard. The cleaner (a detached actor of every
      run) asks Ray's state API each second whether the run's controller is alive, to free the run's
      placement group if it died. The state API is served by the dashboard; a local Ray of this job starts
      none, so there the cleaner could never tell, printed "Failed to query Ray Train Controller actor state"
      on the console each second (dozens of lines a run), and cost a process start and ~1.8 s a run (a bare
      TorchTrainer.fit of 2 workers: 9.7 s with it, 7.9 s without). On a cluster with a dashboard (KubeRay,
      `ray start --head`) it is kept.
    - the datasets callback, in a run without Ray Data datasets (the training workers read their cached
      splits themselves: train/batches.py `DirectSplits`). It starts a `DatasetManager` actor, which imports
      Ray Data, to hand the workers shards of no dataset: about 1 CPU-second of a small run's 9 (a bare fit
      of one worker: `docs/performance.md`)."""
    from ray._private.worker import get_dashboard_url
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    no_dashboard = not get_dashboard_url()

    class PipelineTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            drop = tuple(cls for cls, idle in ((PlacementGroupCleanerCallback, no_dashboard),
                                               (DatasetsCallback, not self.datasets)) if idle)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

    return PipelineTorchTrainer


LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}
"""A local Ray keeps idle worker processes for ten minutes (Ray's default: 1 s beyond a soft limit, which the
Train and Data actors exceed). A job runs several passes (prepare, training, scoring), each starting tasks that
import torch, pyarrow and the pipeline; with the default each pass started its processes anew: a Ray Data pass
right after training took 22 s instead of 2 s on 10,000 rows (a minute was too short: training outlasts it).
On a cluster, set RAY_idle_worker_killing_time_threshold_ms=600000 in the nodes' environment for the same
effect (infra/k8s/raycluster.yaml does)."""


LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "MIMALLOC_PURGE_DELAY": "0"}
"""Set (unless already set) in a local Ray's environment, which its processes inherit. Ray Train's controller
polls its workers every 2 s and only then sees that they finished: a job's training pass ended 2-5 s after
its last step (a bare TorchTrainer.fit here: 21.6 s at 2 s, 17.2-19.4 s at 0.2 s). 0.5 s keeps most of that
at a quarter of the polls. MIMALLOC_PURGE_DELAY=0: pyarrow's allocator (mimalloc) gives freed pages back to
the system at once; by default a worker process kept its peak (a read task's decoded batches) for as long as
it lived, and Ray keeps idle workers for ten minutes (LOCAL_SYSTEM_CONFIG), so every pass left its workers at
their peak. On a cluster, set both in the nodes' environment (infra/k8s does)."""


def local_ray_environment() -> None:
    """The environment a local Ray of this job starts with (before `ray.init`): loopback, `LOCAL_ENV`."""
    # Bind loopback for a local cluster (Ray otherwise binds the machine's interface address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local(num_cpus: Optional[int] = None, **init_kwargs) -> None:
    """Start a new local Ray of this process's own (never join one another process started), on loopback.

    Its GCS port is chosen here and handed to the cluster's processes as RAY_ADDRESS: Ray Train's placement
    group cleaner (an actor of every TorchTrainer run) looks its controller up through the state API with no
    address, which otherwise raises "Found multiple active Ray instances" (and prints a traceback) whenever
    a second Ray runs on the machine. The driver's own environment is left as it was, so that processes it
    starts later do not join this cluster by accident."""
    import ray

    local_ray_environment()
    port = free_loopback_port()
    pinned = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in pinned}
    os.environ.update(pinned)  # the raylet and the GCS copy the environment when they start
    try:
        # address="local": always a new cluster; RAY_ADDRESS is read only for address=None or "auto"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _system_config=LOCAL_SYSTEM_CONFIG, **init_kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def connect(num_cpus: Optional[int] = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local one of its own.

    Under `ray job submit`, `ray.init(num_cpus=...)` raises, so only a plain `ray.init()` is used there.
    """
    import ray

    _quiet_ray_libraries()
    if ray.is_initialized():
        return
    level = getattr(logging, ray_log_level())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=level)
        return
    start_local(num_cpus, logging_level=level)
