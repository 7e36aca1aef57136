"""`make scale`: the job on 1x and 50x the rows with Ray's object store capped well below the data size.

    python -m benchmarks.scale                                   # 200,000 and 10,000,000 rows x 64 features
    python -m benchmarks.scale --rows-nx 1000000 --out scale-dev # a quicker look

For each size: generate float32 Parquet shards (~160 MB each) on local disk, then run one job process (its own
local Ray: `--num-cpus` CPUs, an object store of `--object-store-mb`) that runs prepare, a one-epoch
training run (with its threshold pass over the validation rows, in the training workers), and scoring. The 1x
input runs twice: with the defaults (small splits train from the workers' memory: `cached`) and with train.cache_fraction=0 (`streamed`, the path
the 50x input takes), so the epoch compares like with like. Recorded per run: seconds and rows/s per stage,
which training path it took, the bytes Ray spilled to disk, and memory (sum of PSS over the job's process
tree, sampled every 0.2 s, as `make bench` does): the peak over the job and, per stage, the peak of each part
(driver, Ray workers, Ray's own processes, object store pages). Writes `<out>.json` and `<out>.md`.

Targets: time per stage at 50x <= 55x the 1x time on the same path; the streamed epoch's time per
row at 50x <= 1.5x that at 1x; peak memory at 50x <= 1.3x that at 1x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARD_ROWS = 600_000
"""Rows per shard: 600,000 x 64 float32 features is ~155 MB of Parquet (realistic shard size, 128-256 MB)."""
ROW_GROUP_ROWS = 131_072
STAGES = ("prepare", "train_epoch", "threshold", "score")
MEMORY_STAGES = ("prepare", "train", "score")
"""Where the job process is (`run_stages` writes it to the stage file): the sampler keeps a peak per stage."""
PARTS = ("driver", "workers", "ray", "object_store")
TIME_TARGET, MEMORY_TARGET, ROW_COST_TARGET = 55 / 50, 1.3, 1.5


def generate(path: Path, rows: int, features: int) -> dict[str, Any]:
    """Shards of `rows` x `features` (a `features` list<float32> column plus `id`), made once per size."""
    from pipeline.sample import generate as sample_rows

    def on_disk() -> tuple[int, int]:
        shards = list(path.glob("*.parquet"))
        return len(shards), sum(f.stat().st_size for f in shards)

    marker = path / "_READY.json"
    if marker.exists() and json.loads(marker.read_text()) == {"rows": rows, "features": features}:
        files, size = on_disk()
        return {"rows": rows, "files": files, "bytes": size, "seconds": 0.0}
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    t0 = time.perf_counter()
    per = min(SHARD_ROWS, -(-rows // 4))  # at least 4 shards, so 1x reads in parallel too
    for s, lo in enumerate(range(0, rows, per)):
        n = min(per, rows - lo)
        x, _ = sample_rows(n, features, seed=s)
        offsets = pa.array(np.arange(0, (n + 1) * features, features, dtype=np.int32))
        table = pa.table({"id": pa.array(np.arange(lo, lo + n, dtype=np.int64)),
                          "features": pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))})
        pq.write_table(table, path / f"part-{s:05d}.parquet", row_group_size=ROW_GROUP_ROWS)
        del x, table
    marker.write_text(json.dumps({"rows": rows, "features": features}))
    files, size = on_disk()
    print(f"[scale] generated {rows:,} rows in {files} files ({size / 2**20:,.0f} MB) in "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return {"rows": rows, "files": files, "bytes": size, "seconds": time.perf_counter() - t0}


def job_config(data: Path, work: Path, label: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """The job's config: defaults except one epoch, one training worker sharing the CPUs with Ray Data."""
    from pipeline.config import load_config

    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [
        f"run.name=scale-{label}", f"data.input={data}", "data.timestamp_column=null",
        f"artifacts.uri={work / 'artifacts'}", f"output.uri={work / 'output' / label}",
        "train.epochs=1", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.batch_size=1024",
        "score.concurrency=2", "score.cpus_per_actor=1",
        # one model, the plain loss: the data path is what scales with the rows (an ensemble multiplies the
        # step time alike at every size)
        "model.ensemble=1", "train.trim_fraction=0", *overrides,
    ])
    return cfg.to_dict()


STREAMED = ("train.cache_fraction=0",)
"""What makes a small input take the large input's training path: Ray Data streams it every epoch."""


# ------------------------------------------------------------------------------------------ memory by part


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, PSS of shared memory) of a process in bytes, from /proc/<pid>/smaps_rollup. Ray's object store
    is a shared-memory mapping in the raylet and every worker, so the second number is its pages' share."""
    pss = shmem = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Pss_Shmem:"):
                shmem = int(line.split()[1]) * 1024
    return pss, shmem


def part_of(root_pid: int, pid: int, cmdline: list[str]) -> str:
    """Which part of the job a process is: the driver (the job process), a Ray worker (tasks and actors:
    Ray titles them `ray::...`), or Ray's own processes (raylet, GCS, agents, log monitor)."""
    if pid == root_pid:
        return "driver"
    return "workers" if cmdline and cmdline[0].startswith("ray::") else "ray"


def tree_parts(proc) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """MB per part of the process tree (the object store's shared pages apart, summed over every process
    that maps them), and each process's title with its MB (PSS without the shared pages)."""
    import psutil

    mb = dict.fromkeys(PARTS, 0.0)
    procs = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            cmd = p.cmdline()
            pss, shmem = _rollup(p.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, FileNotFoundError, ProcessLookupError):
            continue
        part = part_of(proc.pid, p.pid, cmd)
        mb[part] += (pss - shmem) / 2**20
        mb["object_store"] += shmem / 2**20
        title = (cmd[0] if part == "workers" else " ".join(cmd)[:80]) if cmd else p.name()
        procs.append((title[:60], (pss - shmem) / 2**20))
    return mb, procs


def stage_peaks(samples: list[tuple[str, dict[str, float], list[tuple[str, float]]]]) -> dict[str, Any]:
    """Per stage: the peak of the whole tree with the largest processes at that moment, and each part's own
    peak (the parts peak at different moments, so their peaks need not add up to the total's)."""
    out: dict[str, Any] = {}
    for stage, mb, procs in samples:
        total = sum(mb.values())
        s = out.setdefault(stage, {"peak_mb": 0.0, **{p: 0.0 for p in PARTS}, "top": [], "samples": 0})
        s["samples"] += 1
        for p in PARTS:
            s[p] = max(s[p], round(mb[p], 1))
        if total > s["peak_mb"]:
            s["peak_mb"] = round(total, 1)
            s["top"] = [[t, round(m, 1)] for t, m in sorted(procs, key=lambda x: -x[1])[:12]]
    return out


def run_sampled(cmd: list[str], env: dict[str, str], log_path: Path, stage_file: Path, interval: float = 0.2,
                timeout: float = 7200) -> dict[str, Any]:
    """Run `cmd`, sampling its process tree's memory by part until it exits, each sample filed under the
    stage the job wrote to `stage_file` last. Raises if it fails."""
    from benchmarks.sampling import sample_while_running

    stage_file.write_text("start")
    samples = []

    def sample(ps) -> None:
        stage = stage_file.read_text().strip() or "start"
        mb, procs = tree_parts(ps)
        samples.append((stage, mb, procs))

    seconds = sample_while_running(cmd, env, log_path, sample, interval, timeout)
    stages = stage_peaks(samples)
    return {"peak_mb": max((s["peak_mb"] for s in stages.values()), default=0.0), "measure": "pss",
            "stages": stages, "samples": len(samples), "seconds": seconds}


# ------------------------------------------------------------------------------------------ the job process


def spilled_bytes() -> int:
    """Bytes this Ray cluster spilled to disk so far (from the raylets' memory summary)."""
    import ray
    from ray._private.internal_api import memory_summary

    # this job's own Ray, by address (other Rays may run on the machine)
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return int(m.group(1)) * 2**20 if m else 0


def run_stages(config_path: str, result_path: str, num_cpus: int, object_store_mb: int,
               stage_file: Optional[str] = None) -> None:
    """In the measured process: prepare, one training epoch (+ threshold pass) and scoring, each timed; the
    stage it is in written to `stage_file` for the memory sampler."""
    import logging

    import ray
    import yaml

    from pipeline import jobs
    from pipeline.train import driver
    from pipeline.cluster import start_local
    from pipeline.config import config_from_dict

    cfg = config_from_dict(yaml.safe_load(Path(config_path).read_text()))
    start_local(num_cpus, object_store_memory=object_store_mb * 2**20, logging_level=logging.WARNING)
    times: dict[str, float] = {}

    def mark(stage: str) -> None:
        if stage_file:
            Path(stage_file).write_text(stage)

    def timed(name: str, fn, stage: str):
        def wrapper(*args, **kwargs):
            mark(stage)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
                mark("other")
        return wrapper

    cached: list[bool] = []

    def cache_splits(*args, **kwargs) -> bool:
        cached.append(driver.cache_splits_unwrapped(*args, **kwargs))
        return cached[-1]

    # the job's own stages, timed where train_job calls them
    jobs.prepare = timed("prepare", jobs.prepare, "prepare")
    jobs.fit = timed("train_run", jobs.fit, "train")
    driver.cache_splits_unwrapped, driver.cache_splits = driver.cache_splits, cache_splits  # which path fit took
    mark("other")
    t0 = time.perf_counter()
    summary = jobs.train_job(cfg, overwrite=True)
    times["train_job"] = time.perf_counter() - t0
    times["threshold"] = summary.manifest["history"][-1]["threshold_seconds"]  # in the workers, after training
    spill_train = spilled_bytes()
    mark("score")
    res = jobs.score_job(cfg, run_date=dt.date(2026, 1, 1))
    mark("other")
    times["score"] = res.seconds
    epoch = summary.manifest["history"][0]
    out = {"times": times, "train_epoch_seconds": epoch["epoch_seconds"], "train_rows": summary.train_rows,
           "train_path": "cached" if cached and cached[0] else "streamed",
           "epoch_validation_seconds": epoch.get("validation_seconds"), "epoch_step_seconds": epoch["step_seconds"],
           "data_wait_fraction": epoch.get("data_wait_fraction"),
           "validation_rows": summary.validation_rows, "scored_rows": res.scored_rows,
           "score_phases": res.phases, "threshold": summary.threshold, "val_loss": summary.best_val_loss,
           "spilled_bytes_train": spill_train, "spilled_bytes": spilled_bytes()}
    Path(result_path).write_text(json.dumps(out))
    ray.shutdown()


# ------------------------------------------------------------------------------------------ the driver


def measure(label: str, rows: int, args, work: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """One job process on `rows` rows (made once per size), its config the defaults plus `overrides`."""
    import yaml

    data = work / f"data-{rows}"
    gen = generate(data, rows, args.features)
    cfg_path, res_path = work / f"config-{label}.yaml", work / f"result-{label}.json"
    cfg_path.write_text(yaml.safe_dump(job_config(data, work, label, overrides)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))  # a local Ray of its own
    env.pop("RAY_ADDRESS", None)
    stage_file = work / f"stage-{label}.txt"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--stages", str(cfg_path), "--result", str(res_path),
           "--stage-file", str(stage_file), "--num-cpus", str(args.num_cpus),
           "--object-store-mb", str(args.object_store_mb)]
    load = os.getloadavg()[0]
    print(f"[scale] {label}: {rows:,} rows{' (' + ', '.join(overrides) + ')' if overrides else ''} "
          f"(load {load:.1f})", flush=True)
    mem = run_sampled(cmd, env, work / f"job-{label}.log", stage_file, timeout=args.timeout)
    r = json.loads(res_path.read_text())
    t = r["times"]
    stages = {"prepare": t["prepare"], "train_epoch": r["train_epoch_seconds"], "threshold": t["threshold"],
              "score": t["score"]}
    print(f"[scale] {label}: {r['train_path']} epoch; " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())
          + f"; peak {mem['peak_mb']:,.0f} MB (" + ", ".join(
              f"{s} {mem['stages'][s]['peak_mb']:,.0f}" for s in MEMORY_STAGES if s in mem["stages"])
          + f"); spilled {r['spilled_bytes'] / 2**20:,.0f} MiB", flush=True)
    return {"rows": rows, "overrides": list(overrides), "data": gen, "stages": stages, "peak_mb": mem["peak_mb"],
            "memory_measure": mem["measure"], "memory_stages": mem["stages"], "job_seconds": mem["seconds"],
            "load_before": load, "load_after": os.getloadavg()[0], **r}


STAGE_ROWS = {"prepare": "rows", "train_epoch": "train_rows", "threshold": "validation_rows", "score": "scored_rows"}


def summarize(one: dict[str, Any], streamed: dict[str, Any], big: dict[str, Any], args) -> dict[str, Any]:
    """The three runs side by side: each stage's time ratio against the 1x run that took the same path as the
    large one, the streamed epoch's cost per row, and peak memory (the job's and per stage and part)."""
    scale = big["rows"] / one["rows"]
    same = streamed if big["train_path"] == "streamed" else one  # the 1x run on the large input's path
    stages = {}
    for s in STAGES:
        base = same if s in ("train_epoch", "threshold") else one  # the threshold pass runs on the training path
        a, b = base["stages"][s], big["stages"][s]
        stages[s] = {"seconds_1x": round(one["stages"][s], 2), "seconds_1x_streamed": round(streamed["stages"][s], 2),
                     "seconds_nx": round(b, 2), "baseline": "1x streamed" if base is streamed else "1x",
                     "time_ratio": round(b / a, 2), "rows_per_s_1x": round(base[STAGE_ROWS[s]] / a),
                     "rows_per_s_nx": round(big[STAGE_ROWS[s]] / b), "meets_target": b / a <= TIME_TARGET * scale}
    us_1x = streamed["stages"]["train_epoch"] / streamed["train_rows"] * 1e6
    us_nx = big["stages"]["train_epoch"] / big["train_rows"] * 1e6
    row_cost = {"us_per_row_1x": round(us_1x, 3), "us_per_row_nx": round(us_nx, 3), "ratio": round(us_nx / us_1x, 3),
                "meets_target": us_nx / us_1x <= ROW_COST_TARGET,
                "what": "streamed epoch (training steps + validation) seconds per training row, per worker"}
    ratio = big["peak_mb"] / one["peak_mb"]
    return {
        "rows_1x": one["rows"], "rows_nx": big["rows"], "scale": scale, "features": args.features,
        "paths": {"1x": one["train_path"], "1x_streamed": streamed["train_path"], "nx": big["train_path"]},
        "stages": stages, "streamed_epoch_row_cost": row_cost,
        "memory": {"peak_mb_1x": round(one["peak_mb"]), "peak_mb_1x_streamed": round(streamed["peak_mb"]),
                   "peak_mb_nx": round(big["peak_mb"]), "ratio": round(ratio, 3),
                   "ratio_to_1x_streamed": round(big["peak_mb"] / streamed["peak_mb"], 3),
                   "meets_target": ratio <= MEMORY_TARGET,
                   "meets_target_same_path": big["peak_mb"] / same["peak_mb"] <= MEMORY_TARGET,
                   "measure": one["memory_measure"],
                   "stages": {"1x": one["memory_stages"], "1x_streamed": streamed["memory_stages"],
                              "nx": big["memory_stages"]},
                   "what": "peak over the job (prepare, train (the threshold pass included), score) of the sum "
                           "of PSS over its process tree: driver, GCS, raylet, Ray workers, object store pages; per stage, each "
                           "part's own peak (object store: the shared-memory pages' PSS summed over processes)"},
        "spilled_bytes_1x": one["spilled_bytes"], "spilled_bytes_1x_streamed": streamed["spilled_bytes"],
        "spilled_bytes_nx": big["spilled_bytes"], "spilled_bytes_nx_after_training": big["spilled_bytes_train"],
        "object_store_bytes": args.object_store_mb * 2**20, "num_cpus": args.num_cpus,
        "data_bytes_nx": big["data"].get("bytes"), "files_nx": big["data"]["files"],
        "threshold_1x": one["threshold"], "threshold_nx": big["threshold"],
        "load": {"1x": [one["load_before"], one["load_after"]],
                 "1x_streamed": [streamed["load_before"], streamed["load_after"]],
                 "nx": [big["load_before"], big["load_after"]], "cpus": os.cpu_count()},
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": {"1x": one, "1x_streamed": streamed, "nx": big},
    }


def markdown(res: dict[str, Any]) -> str:
    n = f"{res['scale']:g}x"
    paths = res["paths"]
    lines = [f"# make scale: {res['rows_1x']:,} vs {res['rows_nx']:,} rows x {res['features']} features",
             "", f"Object store capped at {res['object_store_bytes'] / 2**20:,.0f} MiB "
             f"(data at {n}: {(res['data_bytes_nx'] or 0) / 2**20:,.0f} MiB in {res['files_nx']} files); "
             f"{res['num_cpus']} CPUs for Ray; 1-minute load average before/after: 1x {res['load']['1x']}, "
             f"1x streamed {res['load']['1x_streamed']}, {n} {res['load']['nx']} on {res['load']['cpus']} cores; "
             f"{res['date']}.", "",
             f"Training path by default: 1x {paths['1x']}, {n} {paths['nx']} (`1x streamed`: the 1x input with "
             f"{', '.join(STREAMED)}, which took the {paths['1x_streamed']} path). Each ratio compares {n} with "
             "the 1x run on the same path (`baseline`).", "",
             f"| stage | 1x s | 1x streamed s | {n} s | baseline | time ratio (target <= "
             f"{TIME_TARGET * res['scale']:g}) | rows/s baseline | rows/s {n} |",
             "|---|---|---|---|---|---|---|---|"]
    for s, v in res["stages"].items():
        lines.append(f"| {s} | {v['seconds_1x']} | {v['seconds_1x_streamed']} | {v['seconds_nx']} | {v['baseline']} | "
                     f"{v['time_ratio']} {'ok' if v['meets_target'] else 'MISSED'} | {v['rows_per_s_1x']:,} | "
                     f"{v['rows_per_s_nx']:,} |")
    rc = res["streamed_epoch_row_cost"]
    m = res["memory"]
    lines += ["", f"Streamed epoch per training row: {rc['us_per_row_1x']} us at 1x, {rc['us_per_row_nx']} us at {n}: "
              f"ratio {rc['ratio']} (target <= {ROW_COST_TARGET}, {'ok' if rc['meets_target'] else 'MISSED'}).", "",
              f"Peak memory (whole process tree, {m['measure'].upper()}): {m['peak_mb_1x']:,} MB at 1x, "
              f"{m['peak_mb_1x_streamed']:,} MB at 1x streamed, {m['peak_mb_nx']:,} MB at {n}: ratio {m['ratio']} "
              f"to 1x (target <= {MEMORY_TARGET}, {'ok' if m['meets_target'] else 'MISSED'}), "
              f"{m['ratio_to_1x_streamed']} to 1x streamed"
              + (f" (the same path: {'ok' if m['meets_target_same_path'] else 'MISSED'})"
                 if paths["nx"] == "streamed" else "") + ".",
              f"Spilled: {res['spilled_bytes_1x'] / 2**20:,.0f} MiB at 1x, "
              f"{res['spilled_bytes_1x_streamed'] / 2**20:,.0f} MiB at 1x streamed, "
              f"{res['spilled_bytes_nx'] / 2**20:,.0f} MiB at {n} "
              f"({res['spilled_bytes_nx_after_training'] / 2**20:,.0f} MiB of it by the end of training).", "",
              "Peak memory per stage, MB (each part's own peak in the stage; the total is the tree's peak):", "",
              "| run | stage | total | driver | workers | Ray processes | object store "
              "| largest processes at the peak |",
              "|---|---|---|---|---|---|---|---|"]
    names = {"1x": "1x", "1x_streamed": "1x streamed", "nx": n}
    for run, stages in m["stages"].items():
        for s in MEMORY_STAGES:
            if s not in stages:
                continue
            v = stages[s]
            top = "; ".join(f"{t} {mb:,.0f}" for t, mb in v["top"][:3])
            lines.append(f"| {names[run]} | {s} | {v['peak_mb']:,.0f} | {v['driver']:,.0f} | "
                         f"{v['workers']:,.0f} | {v['ray']:,.0f} | {v['object_store']:,.0f} | {top} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows-1x", type=int, default=200_000)
    p.add_argument("--rows-nx", type=int, default=10_000_000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--object-store-mb", type=int, default=1024)
    p.add_argument("--work", default="scale-work", help="local directory for data, artifacts and output")
    p.add_argument("--out", default="scale-results", help="writes <out>.json and <out>.md")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--stages", help=argparse.SUPPRESS)  # internal: run the stages in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stage-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stages:
        run_stages(args.stages, args.result, args.num_cpus, args.object_store_mb, args.stage_file)
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    one = measure("1x", args.rows_1x, args, work)
    streamed = measure("1x-streamed", args.rows_1x, args, work, STREAMED)
    big = measure("nx", args.rows_nx, args, work)
    res = summarize(one, streamed, big, args)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2))
    Path(f"{args.out}.md").write_text(markdown(res))
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
