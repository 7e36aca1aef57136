"""`make scale`: the job on 1x and 50x the rows with Ray's object store capped well below the data size.

    python -m benchmarks.scale                                   # 200,000 and 10,000,000 rows x 64 features
    python -m benchmarks.scale --rows-nx 1000000 --out scale-dev # a quicker look

For each size: generate float32 Parquet shards (~160 MB each) on local disk, then run one job process (its own
local Ray: `--num-cpus` CPUs, an object store of `--object-store-mb`) that runs prepare, a one-epoch
training run (with its validation/threshold pass), and scoring. Recorded per size: seconds and rows/s per stage,
the peak memory of the job's whole process tree (sum of PSS, sampled every 0.2 s, as `make bench` does), and
the bytes Ray spilled to disk. Writes `<out>.json` and `<out>.md`.

Targets (issue 12): time per stage at 50x <= 55x the 1x time; peak memory at 50x <= 1.3x that at 1x.
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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARD_ROWS = 600_000
"""Rows per shard: 600,000 x 64 float32 features is ~155 MB of Parquet (realistic shard size, 128-256 MB)."""
ROW_GROUP_ROWS = 131_072
STAGES = ("prepare", "train_epoch", "threshold", "score")
TIME_TARGET, MEMORY_TARGET = 55 / 50, 1.3


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


def job_config(data: Path, work: Path, label: str) -> dict[str, Any]:
    """The job's config: defaults except one epoch, one training worker sharing the CPUs with Ray Data."""
    from pipeline.config import load_config

    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [
        f"run.name=scale-{label}", f"data.input={data}", "data.timestamp_column=null",
        f"artifacts.uri={work / 'artifacts'}", f"output.uri={work / 'output' / label}",
        "train.epochs=1", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.batch_size=1024",
        "score.concurrency=2", "score.cpus_per_actor=1",
        # one model, the plain loss: the data path is what scales with the rows (an ensemble multiplies the
        # step time alike at every size)
        "model.ensemble=1", "train.trim_fraction=0",
    ])
    return cfg.to_dict()


# ------------------------------------------------------------------------------------------ the job process


def spilled_bytes() -> int:
    """Bytes this Ray cluster spilled to disk so far (from the raylets' memory summary)."""
    import ray
    from ray._private.internal_api import memory_summary

    # this job's own Ray, by address (other Rays may run on the machine)
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return int(m.group(1)) * 2**20 if m else 0


def run_stages(config_path: str, result_path: str, num_cpus: int, object_store_mb: int) -> None:
    """In the measured process: prepare, one training epoch (+ threshold pass) and scoring, each timed."""
    import logging

    import ray
    import yaml

    from pipeline import jobs
    from pipeline.cluster import LOCAL_SYSTEM_CONFIG, local_ray_environment
    from pipeline.config import config_from_dict

    cfg = config_from_dict(yaml.safe_load(Path(config_path).read_text()))
    # address="local": a new Ray of its own, never a cluster that happens to run on the machine
    local_ray_environment()
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
             logging_level=logging.WARNING, _system_config=LOCAL_SYSTEM_CONFIG)
    times: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # the job's own stages, timed where train_job calls them
    jobs._prepare = timed("prepare", jobs._prepare)
    jobs.fit = timed("train_run", jobs.fit)
    jobs.validation_errors = timed("threshold", jobs.validation_errors)
    t0 = time.perf_counter()
    summary = jobs.train_job(cfg, overwrite=True)
    times["train_job"] = time.perf_counter() - t0
    spill_train = spilled_bytes()
    res = jobs.score_job(cfg, run_date=dt.date(2026, 1, 1))
    times["score"] = res.seconds
    epoch = summary.manifest["history"][0]
    out = {"times": times, "train_epoch_seconds": epoch["epoch_seconds"], "train_rows": summary.train_rows,
           "validation_rows": summary.validation_rows, "scored_rows": res.scored_rows,
           "score_phases": res.phases, "threshold": summary.threshold, "val_loss": summary.best_val_loss,
           "spilled_bytes_train": spill_train, "spilled_bytes": spilled_bytes()}
    Path(result_path).write_text(json.dumps(out))
    ray.shutdown()


# ------------------------------------------------------------------------------------------ the driver


def measure(label: str, rows: int, args, work: Path) -> dict[str, Any]:
    import yaml

    from benchmarks.bench import peak_tree_memory

    data = work / f"data-{rows}"
    gen = generate(data, rows, args.features)
    cfg_path, res_path = work / f"config-{label}.yaml", work / f"result-{label}.json"
    cfg_path.write_text(yaml.safe_dump(job_config(data, work, label)))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))  # a local Ray of its own
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "benchmarks.scale", "--stages", str(cfg_path), "--result", str(res_path),
           "--num-cpus", str(args.num_cpus), "--object-store-mb", str(args.object_store_mb)]
    load = os.getloadavg()[0]
    print(f"[scale] {label}: {rows:,} rows (load {load:.1f})", flush=True)
    mem = peak_tree_memory(cmd, env, work / f"job-{label}.log", timeout=args.timeout)
    r = json.loads(res_path.read_text())
    t = r["times"]
    stages = {"prepare": t["prepare"], "train_epoch": r["train_epoch_seconds"], "threshold": t["threshold"],
              "score": t["score"]}
    print(f"[scale] {label}: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())
          + f"; peak {mem['peak_mb']:,.0f} MB; spilled {r['spilled_bytes'] / 2**20:,.0f} MiB", flush=True)
    return {"rows": rows, "data": gen, "stages": stages, "peak_mb": mem["peak_mb"], "memory_measure": mem["measure"],
            "job_seconds": mem["seconds"], "load_before": load, "load_after": os.getloadavg()[0], **r}


def summarize(one: dict[str, Any], big: dict[str, Any], args) -> dict[str, Any]:
    scale = big["rows"] / one["rows"]
    stage_rows = {"prepare": "rows", "train_epoch": "train_rows", "threshold": "validation_rows", "score": "scored_rows"}
    stages = {}
    for s in STAGES:
        a, b = one["stages"][s], big["stages"][s]
        stages[s] = {"seconds_1x": round(a, 2), "seconds_nx": round(b, 2), "time_ratio": round(b / a, 2),
                     "rows_per_s_1x": round(one[stage_rows[s]] / a), "rows_per_s_nx": round(big[stage_rows[s]] / b),
                     "meets_target": b / a <= TIME_TARGET * scale}
    ratio = big["peak_mb"] / one["peak_mb"]
    return {
        "rows_1x": one["rows"], "rows_nx": big["rows"], "scale": scale, "features": args.features,
        "stages": stages,
        "memory": {"peak_mb_1x": round(one["peak_mb"]), "peak_mb_nx": round(big["peak_mb"]), "ratio": round(ratio, 3),
                   "meets_target": ratio <= MEMORY_TARGET, "measure": one["memory_measure"],
                   "what": "peak over the job (prepare, train, threshold, score) of the sum of PSS over its "
                           "process tree: driver, GCS, raylet, Ray workers, object store pages"},
        "spilled_bytes_1x": one["spilled_bytes"], "spilled_bytes_nx": big["spilled_bytes"],
        "spilled_bytes_nx_after_training": big["spilled_bytes_train"],
        "object_store_bytes": args.object_store_mb * 2**20, "num_cpus": args.num_cpus,
        "data_bytes_nx": big["data"].get("bytes"), "files_nx": big["data"]["files"],
        "threshold_1x": one["threshold"], "threshold_nx": big["threshold"],
        "load": {"1x": [one["load_before"], one["load_after"]], "nx": [big["load_before"], big["load_after"]],
                 "cpus": os.cpu_count()},
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runs": {"1x": one, "nx": big},
    }


def markdown(res: dict[str, Any]) -> str:
    n = f"{res['scale']:g}x"
    lines = [f"# make scale: {res['rows_1x']:,} vs {res['rows_nx']:,} rows x {res['features']} features",
             "", f"Object store capped at {res['object_store_bytes'] / 2**20:,.0f} MiB "
             f"(data at {n}: {(res['data_bytes_nx'] or 0) / 2**20:,.0f} MiB in {res['files_nx']} files); "
             f"{res['num_cpus']} CPUs for Ray; 1-minute load average before/after: 1x {res['load']['1x']}, "
             f"{n} {res['load']['nx']} on {res['load']['cpus']} cores (other work shares them); "
             f"{res['date']}.", "",
             f"| stage | 1x s | {n} s | time ratio (target <= {TIME_TARGET * res['scale']:g}) | rows/s 1x | rows/s {n} |",
             "|---|---|---|---|---|---|"]
    for s, v in res["stages"].items():
        lines.append(f"| {s} | {v['seconds_1x']} | {v['seconds_nx']} | {v['time_ratio']} "
                     f"{'ok' if v['meets_target'] else 'MISSED'} | {v['rows_per_s_1x']:,} | {v['rows_per_s_nx']:,} |")
    m = res["memory"]
    lines += ["", f"Peak memory (whole process tree, {m['measure'].upper()}): {m['peak_mb_1x']:,} MB at 1x, "
              f"{m['peak_mb_nx']:,} MB at {n}: ratio {m['ratio']} (target <= {MEMORY_TARGET}, "
              f"{'ok' if m['meets_target'] else 'MISSED'}).",
              f"Spilled: {res['spilled_bytes_1x'] / 2**20:,.0f} MiB at 1x, {res['spilled_bytes_nx'] / 2**20:,.0f} MiB at "
              f"{n} ({res['spilled_bytes_nx_after_training'] / 2**20:,.0f} MiB of it by the end of training).", ""]
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
    args = p.parse_args(argv)
    if args.stages:
        run_stages(args.stages, args.result, args.num_cpus, args.object_store_mb)
        return 0
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    one = measure("1x", args.rows_1x, args, work)
    big = measure("nx", args.rows_nx, args, work)
    res = summarize(one, big, args)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2))
    Path(f"{args.out}.md").write_text(markdown(res))
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
