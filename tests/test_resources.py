"""Resource arithmetic (pipeline/resources.py) and the stall watchdog's clock (pipeline/watchdog.py): pure, no
Ray. The same rules on a real Ray cluster, end to end, are in tests/test_hangs.py."""

from __future__ import annotations

import signal
import time

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.resources import DATA_CPUS, Cluster, Node, fit_job, plan_actor_pool, plan_training
from pipeline.watchdog import StallError, Watchdog

LAPTOP = Cluster((Node(2),), available_cpus=2)
GPU_CLUSTER = Cluster((Node(8), Node(16, 1), Node(16, 1)))


def test_two_workers_at_one_cpu_on_two_cpus_are_lowered_to_leave_ray_data_one():
    """The issue's config: both CPUs to training would leave Ray Data none to read with (a silent hang)."""
    used, note = plan_training(2, 1.0, False, LAPTOP)
    assert used == 0.5
    assert 2 * used + DATA_CPUS <= LAPTOP.cpus
    assert note.startswith("train.cpus_per_worker lowered from 1 to 0.5: 2 training workers x 1 CPU")
    assert "leave Ray Data none of the cluster's 2 CPUs" in note


def test_requests_that_fit_are_kept_as_asked():
    assert plan_training(2, 0.5, False, LAPTOP) == (0.5, None)
    assert plan_training(1, 1.0, False, LAPTOP) == (1.0, None)  # the defaults on a 2-CPU machine
    assert plan_training(2, 4.0, True, GPU_CLUSTER) == (4.0, None)


def test_more_workers_than_cpus_share_what_is_left_after_ray_data():
    used, note = plan_training(3, 1.0, False, LAPTOP)
    assert used == 0.33 and 3 * used <= LAPTOP.cpus - DATA_CPUS
    assert "would leave Ray Data none" in note


def test_more_cpus_per_worker_than_any_node_is_refused_with_the_key_and_figures():
    with pytest.raises(ConfigError) as e:
        plan_training(1, 4.0, False, LAPTOP)
    assert str(e.value) == ("config train.cpus_per_worker: 4 CPUs per worker, but the largest node has 2 CPUs "
                            "(2 CPUs, 0 GPUs on 1 node); set train.cpus_per_worker to at most 2")


def test_gpus_on_a_cpu_only_cluster_are_refused():
    with pytest.raises(ConfigError, match=r"^config train.use_gpu: true, but the cluster has no GPUs "
                                          r"\(2 CPUs, 0 GPUs on 1 node\) and no GPU node type to scale to; "
                                          r"set train.use_gpu: false$"):
        plan_training(1, 0.5, True, LAPTOP)
    with pytest.raises(ConfigError, match="^config score.use_gpu: true"):
        plan_actor_pool(1, 1.0, True, LAPTOP)


def test_gpu_workers_must_fit_the_gpu_nodes():
    with pytest.raises(ConfigError, match=r"3 training workers x 1 GPU, but the cluster has 2 GPUs"):
        plan_training(3, 4.0, True, GPU_CLUSTER)
    with pytest.raises(ConfigError, match=r"largest GPU node has 16 CPUs"):
        plan_training(1, 20.0, True, GPU_CLUSTER)


def test_an_autoscaler_counts_what_the_cluster_may_grow_to():
    head_only = Cluster((Node(2),), scalable=((Node(8, 1), 4),))
    assert plan_training(4, 6.0, True, head_only) == (6.0, None)  # 4 GPU nodes may join
    with pytest.raises(ConfigError, match="5 training workers x 1 GPU, but the cluster has 4 GPUs"):
        plan_training(5, 6.0, True, head_only)
    unbounded = Cluster((Node(2),), scalable=((Node(8, 1), None),))
    assert plan_training(64, 8.0, True, unbounded) == (8.0, None)
    with pytest.raises(ConfigError, match="largest GPU node has 8 CPUs"):
        plan_training(1, 9.0, True, unbounded)


def test_a_one_cpu_cluster_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"^config run.num_cpus: the cluster has 1 CPU; .*set run.num_cpus: 2"):
        plan_training(1, 0.5, False, Cluster((Node(1),)))


def test_an_actor_pool_above_the_cluster_is_refused_and_tasks_above_it_are_capped():
    with pytest.raises(ConfigError) as e:  # a pool waits for all its actors: it could never start
        plan_actor_pool(4, 1.0, False, LAPTOP, fused=False)
    assert str(e.value) == ("config score.concurrency: 4 scoring workers x score.cpus_per_actor 1 = 4 CPUs, "
                            "but the cluster has 2 CPUs (2 CPUs, 0 GPUs on 1 node); set score.concurrency "
                            "to at most 2")
    # plain tasks only cap how many run at once: lowered to what the cluster has (e.g. after losing a node)
    cpa, conc, note = plan_actor_pool(4, 1.0, False, LAPTOP, fused=True)
    assert (cpa, conc) == (1.0, 2) and note.startswith("score.concurrency lowered from 4 to 2: scoring tasks")


def test_fused_scoring_tasks_may_use_every_cpu_but_an_actor_pool_leaves_ray_data_one():
    assert plan_actor_pool(2, 1.0, False, LAPTOP, fused=True) == (1.0, 2, None)
    used, _, note = plan_actor_pool(2, 1.0, False, LAPTOP, fused=False)
    assert used == 0.5 and note.startswith("score.cpus_per_actor lowered from 1 to 0.5: 2 scoring actors x 1 CPU would")


def test_fit_job_returns_the_config_to_run_and_says_what_changed():
    cfg = config_from_dict({"train": {"num_workers": 2}, "score": {"concurrency": 2}})
    lines: list[str] = []
    out = fit_job(cfg, LAPTOP, "train", log=lines.append)
    # scoring's fused tasks after training: nothing to lower for them on 2 CPUs
    assert out.train.cpus_per_worker == 0.5 and out.score.cpus_per_actor == 1.0
    assert cfg.train.cpus_per_worker == 1.0  # the caller's config is left as it was
    assert [ln.split(" lowered")[0] for ln in lines[:1]] == ["[resources] train.cpus_per_worker"]
    assert lines[1] == ("[resources] cluster: 2 CPUs, 0 GPUs on 1 node; 2 training workers x 0.5 CPU + "
                        "Ray Data reading data/sample")
    scored = fit_job(cfg, LAPTOP, "score", log=lines.append)
    assert scored.score.cpus_per_actor == 1.0  # fused tasks: nothing to keep for reading


def test_every_shipped_config_fits_a_two_cpu_machine_or_is_refused_in_one_line():
    from pipeline.config import load_config

    demo = load_config("jobs/configs/tiny.yaml")
    assert fit_job(demo, LAPTOP, "train", log=lambda s: None).train.cpus_per_worker == 0.5
    assert fit_job(demo, LAPTOP, "score", log=lambda s: None).score.cpus_per_actor == 1.0
    prod = load_config("jobs/configs/prod.yaml")
    with pytest.raises(ConfigError, match="^config train.use_gpu: true, but the cluster has no GPUs"):
        fit_job(prod, LAPTOP, "train", log=lambda s: None)
    with pytest.raises(ConfigError, match="^config score.use_gpu: true, but the cluster has no GPUs"):
        fit_job(prod, LAPTOP, "score", log=lambda s: None)
    assert fit_job(config_from_dict({}), LAPTOP, "train", log=lambda s: None).train.cpus_per_worker == 1.0


def test_watchdog_reports_a_silent_phase_and_ends_it_at_the_timeout():
    """The clock: reports while nothing progresses, then interrupts the main thread with the reason."""
    lines: list[str] = []
    w = Watchdog(1.5, "training", "2 training workers x 1 CPU + Ray Data",
                 describe=lambda: "cluster has 2 CPUs, 0 free", report_every_s=0.5, log=lines.append)
    # Python's own SIGINT handler, whatever an earlier test left behind: Ray Train's fit() installs one (a
    # graceful abort) that takes the interrupt without raising, and the watchdog would then end this process
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            w.start()
            for _ in range(300):  # short sleeps: the interrupt lands between them (up to 30 s on a loaded machine)
                time.sleep(0.1)
    finally:
        w.stop()
        signal.signal(signal.SIGINT, previous)
    assert lines and lines[0].startswith("[watchdog] training: no progress for ")
    assert lines[0].endswith("s, waiting for 2 training workers x 1 CPU + Ray Data; cluster has 2 CPUs, 0 free")
    assert isinstance(w.error, StallError)
    assert str(w.error).startswith("stalled: training: no progress for ")
    assert str(w.error).endswith("ended after run.stall_timeout_s 1.5s without progress")


def test_watchdog_stays_quiet_while_progress_arrives():
    lines: list[str] = []
    w = Watchdog(1.0, "scoring", "Ray Data", describe=lambda: "", report_every_s=0.3, log=lines.append).start()
    stop = time.monotonic() + 2.5
    while time.monotonic() < stop:
        w.progress()
        time.sleep(0.05)
    w.stop()
    assert lines == [] and w.error is None
