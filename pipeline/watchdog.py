"""Stall watch: a job that makes no progress says what it waits for, and ends at `run.stall_timeout_s`.

The driver spends a job blocked in `trainer.fit()`, `write_parquet()` or a Ray Data iterator, so a daemon
thread watches for it. Progress is a `beat()` (the training workers beat per batch, the scoring predictor
per batch, the driver per batch it takes from Ray Data), or a change in what Ray has scheduled (CPUs in
use, placement groups). In the driver a beat reaches the watchdog directly; in a Ray worker it goes (at
most once a second) to `Heartbeat`, a small named actor without CPUs that the watchdog polls (one for the
job: every phase's watchdog polls the same one). With no
progress for a while the thread prints one line every REPORT_EVERY_S naming what the phase waits for and
what Ray says is pending (free CPUs/GPUs, pending placement groups, tasks and actors waiting for
resources). At the stall timeout it interrupts the main thread, which unwinds through the job's cleanup
(staging is removed, Ray shut down at exit) and ends with `error: stalled: ...`, exit 2; a main thread
stuck in native code (a storage call that never returns) past GRACE_S is ended by the thread itself.

    with watch(cfg.run.stall_timeout_s, "training", "2 training workers x 0.5 CPU + Ray Data"):
        trainer.fit()
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from pipeline.errors import PipelineError

REPORT_EVERY_S = 60.0
"""A job without progress says so once a minute (more often when the stall timeout is shorter)."""
POLL_S = 2.0
"""How often the watchdog thread reads the heartbeat."""
BEAT_EVERY_S = 1.0
"""A worker sends at most one beat a second: a batch loop never waits on it."""
GRACE_S = 30.0
"""After interrupting the main thread, how long it may take to unwind before the process is ended (a stall
timeout shorter than this: that long)."""
HEARTBEAT = "tabular-autoencoders-heartbeat"


class StallError(PipelineError):
    """The job made no progress for `run.stall_timeout_s` seconds."""


# ------------------------------------------------------------------------------------------ progress


_ACTIVE: Optional["Watchdog"] = None  # the driver's watchdog while a phase is watched


class _Sender:
    """A worker process's link to the heartbeat actor (looked up once, then reused)."""

    handle: Any = None
    looked_up = -1e9
    sent = -1e9


def beat(what: str = "batch") -> None:
    """Record progress. Cheap and never raises: it sits in batch loops, on the driver and in Ray workers."""
    w = _ACTIVE
    if w is not None:
        w.progress()
        return
    if "ray" not in sys.modules:  # not in a Ray process (unit tests of the pure steps)
        return
    now = time.monotonic()
    if now - _Sender.sent < BEAT_EVERY_S:
        return
    _Sender.sent = now
    try:
        import ray

        if not ray.is_initialized():
            return
        # looked up again now and then: a worker process outlives jobs (the session's Ray in tests; a
        # reused worker on a cluster), and a handle from an earlier job would point at that job's actor
        if _Sender.handle is None or now - _Sender.looked_up >= 30:
            if _Sender.handle is None and now - _Sender.looked_up < 30:  # no watchdog (yet): not every batch
                return
            _Sender.looked_up = now
            _Sender.handle = ray.get_actor(_heartbeat_name())
        _Sender.handle.beat.remote(what)
    except Exception:  # noqa: BLE001 - progress reporting must never break the work it reports on
        _Sender.handle = None


def beating(items: Iterator[Any], what: str = "batch") -> Iterator[Any]:
    """`items`, with a beat for each."""
    for x in items:
        beat(what)
        yield x


def _heartbeat_name() -> str:
    import ray

    # one per job: the driver, its train workers and its Ray Data tasks share the job id
    return f"{HEARTBEAT}-{ray.get_runtime_context().get_job_id()}"


_JOB_HEARTBEAT: Optional[tuple[tuple[str, str], Any]] = None
"""The driver's handle on its job's heartbeat actor, with its key (the driver's node, the actor's name): the
actor lives as long as a handle does, so kept here it serves every phase of the job instead of one process per
phase."""


def _heartbeat():
    """The job's heartbeat actor (created on first use; it ends with the job's driver). If the node it ran on
    is lost, Ray starts it again elsewhere: the handle stays valid, and a count that starts over is a change
    the watchdog takes as progress."""
    import ray

    global _JOB_HEARTBEAT
    name = _heartbeat_name()
    key = (ray.get_runtime_context().get_node_id(), name)  # job ids start over in a new cluster
    if _JOB_HEARTBEAT is not None and _JOB_HEARTBEAT[0] == key:
        return _JOB_HEARTBEAT[1]

    @ray.remote(num_cpus=0, max_restarts=-1)
    class Heartbeat:
        def __init__(self):
            self.count, self.what = 0, ""

        def beat(self, what: str) -> None:
            self.count, self.what = self.count + 1, what

        def read(self) -> tuple[int, str]:
            return self.count, self.what

    # a handle kept from another job (a driver that reconnected to Ray) is dropped: its actor ended with that job
    _JOB_HEARTBEAT = (key, Heartbeat.options(name=name, get_if_exists=True).remote())
    return _JOB_HEARTBEAT[1]


# ------------------------------------------------------------------------------------------ Ray's state


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or
                           not k.startswith(("node:", "bundle_group", "memory", "object_store"))) + "}"


def describe_ray() -> str:
    """What Ray says the job may be waiting on: free resources, pending placement groups, tasks, actors."""
    import ray

    parts, free_cpus = [], 0.0
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        free_cpus = free.get("CPU", 0.0)
        parts.append(f"cluster has {total.get('CPU', 0):g} CPUs, {free_cpus:g} free"
                     + (f"; {total.get('GPU', 0):g} GPUs, {free.get('GPU', 0):g} free" if total.get("GPU") else ""))
    except Exception:  # noqa: BLE001 - a description is best effort
        pass
    waiting = []
    try:
        pending = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") == "PENDING"]
        for pg in pending[:3]:
            bundles = list(pg.get("bundles", {}).values())
            if bundles:
                waiting.append(f"placement group pending: {len(bundles)} x {_fmt(bundles[0])}")
    except Exception:  # noqa: BLE001
        pass
    waiting.extend(_pending_tasks_and_actors())
    if not waiting and free_cpus >= 1:
        # nothing queued for resources: the running tasks themselves make no progress
        waiting.append("nothing waits for resources, so the running work is slow or blocked "
                       "(a storage endpoint that does not answer, a hung task)")
    return "; ".join(parts + waiting)


def _pending_tasks_and_actors() -> list[str]:
    """Tasks and actors waiting for resources, from Ray's state API (absent without the dashboard)."""
    try:
        from ray.util.state import list_actors, list_tasks

        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], limit=100, timeout=5,
                           raise_on_missing_output=False)
        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], limit=100, timeout=5,
                             raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - e.g. a local Ray started without its dashboard
        return []
    out = []
    if tasks:
        names = sorted({t.name for t in tasks})
        out.append(f"{len(tasks)} tasks waiting for a node ({', '.join(names[:3])})")
    if actors:
        names = sorted({a.class_name for a in actors})
        out.append(f"{len(actors)} actors waiting for resources ({', '.join(names[:3])})")
    return out


# ------------------------------------------------------------------------------------------ the watchdog


class Watchdog:
    """A daemon thread: reports a phase that makes no progress, and ends it at `timeout_s` (0: never)."""

    def __init__(self, timeout_s: float, phase: str, waiting_for: str, heartbeat: Any = None,
                 describe: Callable[[], str] = describe_ray, report_every_s: Optional[float] = None,
                 log: Callable[[str], None] = lambda s: print(s, flush=True)):
        self.timeout_s, self.phase, self.waiting_for = timeout_s, phase, waiting_for
        self.heartbeat, self.describe, self.log = heartbeat, describe, log
        # a short stall timeout (tests, impatient schedules) gets its reports sooner
        self.report_every_s = report_every_s or (min(REPORT_EVERY_S, max(1.0, timeout_s / 3)) if timeout_s
                                                 else REPORT_EVERY_S)
        self.error: Optional[StallError] = None
        self._last = time.monotonic()
        self._seen: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{phase}", daemon=True)

    def progress(self) -> None:
        self._last = time.monotonic()

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _poll_heartbeat(self) -> None:
        """Progress is a beat, or a change in what Ray has scheduled (CPUs/GPUs in use, placement groups
        made): a worker group starting or tasks starting are progress too."""
        if self.heartbeat is None:
            return
        try:
            import ray

            count, _ = ray.get(self.heartbeat.read.remote(), timeout=10)
            free = ray.available_resources()
            pgs = sorted(pg.get("state", "") for pg in ray.util.placement_group_table().values())
            seen = (count, free.get("CPU"), free.get("GPU"), tuple(pgs))
        except Exception:  # noqa: BLE001 - an unanswered poll is no progress, not a failure
            return
        if seen != self._seen:
            self._seen = seen
            self.progress()

    def _run(self) -> None:
        next_report = self.report_every_s
        while not self._stop.wait(min(POLL_S, self.report_every_s)):
            self._poll_heartbeat()
            idle = time.monotonic() - self._last
            if idle < self.report_every_s:
                next_report = self.report_every_s
                continue
            if self.timeout_s and idle >= self.timeout_s:
                self._fire(idle)
                return
            if idle >= next_report:
                self.log(f"[watchdog] {self.status(idle)}")
                next_report += self.report_every_s

    def status(self, idle: float) -> str:
        ray_state = self.describe()
        return (f"{self.phase}: no progress for {idle:.0f}s, waiting for {self.waiting_for}"
                + (f"; {ray_state}" if ray_state else ""))

    def _fire(self, idle: float) -> None:
        self.error = StallError(f"stalled: {self.status(idle)}; ended after run.stall_timeout_s "
                                f"{self.timeout_s:g}s without progress")
        _thread.interrupt_main()  # the main thread unwinds through the job's cleanup and prints the error
        if self._stop.wait(min(GRACE_S, self.timeout_s)):
            return
        # the main thread is stuck where Python cannot interrupt it (native code): end the process here
        print(f"error: {self.error}", file=sys.stderr, flush=True)
        _shutdown_ray(timeout_s=10)
        os._exit(2)


def _shutdown_ray(timeout_s: float) -> None:
    def _stop() -> None:
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001 - the process ends next either way
            pass

    t = threading.Thread(target=_stop, daemon=True)
    t.start()
    t.join(timeout_s)


@contextmanager
def watch(timeout_s: float, phase: str, waiting_for: str) -> Iterator[Watchdog]:
    """Watch a phase of the job (Ray must be connected). A stall ends it with StallError."""
    global _ACTIVE
    # Ray Train's fit() installs a SIGINT handler (a graceful abort of its controller) and leaves it behind;
    # restored here so a later phase's interrupt is not taken for an abort of a finished run
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    w = Watchdog(timeout_s, phase, waiting_for, heartbeat=_heartbeat()).start()
    _ACTIVE = w
    try:
        yield w
    except BaseException:
        if w.error is not None:  # whatever the interrupt turned into on its way up (Ray wraps it)
            raise w.error from None
        raise
    finally:
        _ACTIVE = None
        w.stop()
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)
    if w.error is not None:  # the interrupt was taken as a graceful abort (Ray Train's handler)
        raise w.error
