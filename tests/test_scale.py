"""`make scale`'s bookkeeping on made-up runs and on this process: memory by part and stage, the like-for-like
comparison and the report. The measuring itself is `make scale`'s (minutes of both cores)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import psutil

from benchmarks.scale import (MEMORY_STAGES, PARTS, STREAMED, _rollup, job_config, markdown, part_of, stage_peaks,
                              summarize, tree_parts)


def test_rollup_reads_this_process_and_its_shared_memory(tmp_path):
    import mmap

    pss, shmem = _rollup(os.getpid())
    assert pss > 10 * 2**20  # torch and pyarrow are loaded
    # 8 MiB of shared memory touched here shows up as this process's shared PSS
    with open("/dev/shm/scale-test-" + str(os.getpid()), "w+b") as f:
        try:
            f.truncate(8 * 2**20)
            m = mmap.mmap(f.fileno(), 8 * 2**20)
            m[:] = b"x" * (8 * 2**20)
            assert _rollup(os.getpid())[1] >= shmem + 8 * 2**20 - 2**16
            m.close()
        finally:
            os.unlink(f.name)


def test_tree_parts_files_each_process_under_its_part():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mb, procs = tree_parts(psutil.Process(os.getpid()))
    finally:
        child.kill()
        child.wait()
    assert set(mb) == set(PARTS)
    assert mb["driver"] > 10 and mb["ray"] > 0  # a child without a `ray::` title is one of Ray's own processes
    assert len(procs) >= 2
    assert part_of(1, 1, ["python"]) == "driver"
    assert part_of(1, 2, ["ray::SplitCoordinator.start_epoch"]) == "workers"
    assert part_of(1, 3, ["/venv/lib/ray/core/src/ray/raylet/raylet", "--flag"]) == "ray"


def test_stage_peaks_keeps_each_parts_peak_and_the_top_processes_at_the_trees_peak():
    def mb(driver, workers, ray, store):
        return dict(zip(PARTS, (driver, workers, ray, store)))

    samples = [("prepare", mb(500, 100, 300, 10), [("driver", 500.0)]),
               ("train", mb(500, 900, 300, 200), [("ray::RayTrainWorker", 800.0), ("driver", 500.0)]),
               ("train", mb(600, 400, 300, 700), [("ray::SplitCoordinator", 300.0), ("driver", 600.0)])]
    peaks = stage_peaks(samples)
    assert peaks["prepare"]["peak_mb"] == 910 and peaks["prepare"]["samples"] == 1
    t = peaks["train"]
    assert t["peak_mb"] == 2000 and t["driver"] == 600 and t["workers"] == 900 and t["object_store"] == 700
    assert t["top"][0] == ["driver", 600.0]  # the processes of the sample at the tree's peak (the second)


def _run(rows: int, path: str, epoch: float, peak: float, stage_peak: float) -> dict:
    stage = {"peak_mb": stage_peak, **{p: stage_peak / 4 for p in PARTS}, "top": [["driver", 500.0]], "samples": 3}
    return {"rows": rows, "train_rows": int(rows * 0.9), "validation_rows": int(rows * 0.1), "scored_rows": rows,
            "train_path": path, "stages": {"prepare": 5.0 * rows / 2e5 ** 0.5 / 447, "train_epoch": epoch,
                                           "threshold": 1.0, "score": 1.0 * rows / 2e5},
            "peak_mb": peak, "memory_measure": "pss", "memory_stages": {s: stage for s in MEMORY_STAGES},
            "spilled_bytes": 0, "spilled_bytes_train": 0, "threshold": 1.0, "data": {"files": 4, "bytes": 1},
            "load_before": 1.0, "load_after": 1.5}


def test_summary_compares_the_epoch_with_the_1x_run_on_the_same_path():
    args = argparse.Namespace(features=64, object_store_mb=1024, num_cpus=2)
    one, streamed = _run(200_000, "cached", 0.8, 2800, 2700), _run(200_000, "streamed", 1.6, 3200, 3100)
    big = _run(10_000_000, "streamed", 100.0, 3500, 3400)
    res = summarize(one, streamed, big, args)
    assert res["paths"] == {"1x": "cached", "1x_streamed": "streamed", "nx": "streamed"}
    epoch = res["stages"]["train_epoch"]
    assert epoch["baseline"] == "1x streamed" and epoch["time_ratio"] == 62.5 and not epoch["meets_target"]
    assert res["stages"]["score"]["baseline"] == "1x" and res["stages"]["score"]["time_ratio"] == 50.0
    # per row: 100 s / 9M rows against 1.6 s / 180k rows
    assert res["streamed_epoch_row_cost"]["ratio"] == 1.25 and res["streamed_epoch_row_cost"]["meets_target"]
    assert res["memory"]["ratio"] == 1.25 and res["memory"]["meets_target"]
    assert res["memory"]["ratio_to_1x_streamed"] == round(3500 / 3200, 3) and res["memory"]["meets_target_same_path"]
    md = markdown(res)
    assert "| train_epoch | 0.8 | 1.6 | 100.0 | 1x streamed | 62.5 MISSED |" in md
    assert "| 50x | train | 3,400 |" in md and "1.094 to 1x streamed (the same path: ok)" in md


def test_streamed_config_turns_the_cache_off(tmp_path):
    cfg = job_config(tmp_path / "data", tmp_path, "1x-streamed", STREAMED)
    assert cfg["train"]["cache_fraction"] == 0
    assert job_config(tmp_path / "data", tmp_path, "1x")["train"]["cache_fraction"] > 0
