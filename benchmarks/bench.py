"""The benchmark: the real pipeline against plain PyTorch / pyarrow, side by side, on the same data and models.

    python -m benchmarks                 # `make bench`: bench-results.json and bench-results.md
    python -m benchmarks --preset tiny   # the same code on thousands of rows; what the test runs

Everything runs against a loopback S3 server (moto), started here and stopped at the end:
  ingest    Ray Data's read of the shards (`read_dataset`, the pipeline's reader) vs `pyarrow.dataset` reading
            the same files from the same server;
  training  `train_job` (TorchTrainer; its workers read and cache the rows) per-worker steady-state rows/s,
            read from the run's history (`worker_rows_per_s`, per epoch: the first batch timed apart) vs a plain
            PyTorch loop over in-memory tensors with the same model, batch size, optimizer, rows and torch
            threads, half its epochs right before the job and half right after;
  scoring   `score` (read -> ScoreBatches -> staged Parquet, fused in a task per file -> verify -> publish), end
            to end after one warm-up run, vs a plain loop (pyarrow read -> the same BatchScorer -> pyarrow write)
            on the same server;
  training_end_to_end  `train_job` wall time for `e2e_epochs` epochs on a small and a medium table vs a plain
            script (pyarrow read -> normalize -> the same epochs -> weights written to the same server); ratio =
            baseline seconds / pipeline seconds (1.0: as fast), with the per-epoch fixed cost from the history;
  ingest_large_shards  the same read as `ingest` on ~`large_shard_mb` MB shards, Ray Data's V1 reader (the
            pipeline's) and its V2 reader, each vs pyarrow.dataset;
  memory    peak memory of `python -m jobs.score` (its whole process tree, Ray's processes included) on
            1x and `memory_scale`x the data.
Baselines run in the same process right before and after the pipeline runs they are compared with, and each
figure is the median of its repeats, so a machine shared with other work skews both sides alike. Each ratio
comes with a spread (`ratio_spread`, [low, high]): where the two sides alternate repeat by repeat (ingest,
scoring), the lowest and highest of the per-repeat ratios; for training, whose samples are a job's epochs
against the plain loop's (a job costs ~20 s of Ray Train start-up, so it is not repeated per sample), the
band between the sides' quartiles, q1(pipeline) / q3(baseline) to q3(pipeline) / q1(baseline). Warm-up runs
(Ray Data's first execution, scoring's first run, the plain loop's first steps) are timed apart or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from pipeline.config import (ArtifactsSection, Config, DataSection, ModelSection, OutputSection, RunSection,
                             ScoreSection, StorageSection, TrainSection)
from pipeline.inputs import InputSpec, inspect_input
from pipeline.read import read_dataset
from pipeline.rows import SplitFeatures
from pipeline.models import build_model
from pipeline.storage import Storage
from pipeline.train.step import make_optimizer
from pipeline.uri import join_uri

TARGETS = {"ingest": 0.8, "training": 0.8, "scoring": 0.8, "memory": 1.3, "ingest_large_shards": 0.8,
           "training_end_to_end": 0.7, "per_epoch_fixed_seconds": 0.3}
BUCKET = "bench"


@dataclass
class ModelSize:
    name: str
    """Label in the results (`small`: per-batch overhead dominates; `large`: compute dominates)."""
    hidden_dims: list[int]
    """Encoder hidden widths (the decoder mirrors them)."""
    latent_dim: int
    """Code width."""
    epochs: int = 3
    """Epochs of each training run, each a sample (pipeline and plain loop alike): enough steady-state
    seconds that a pause of the machine's other work moves the median of neither side."""
    jobs: int = 1
    """Training runs per batch size, in rounds over the model sizes and batch sizes (each: plain loop, job,
    plain loop); their samples are pooled, so the spread shows what differs from one job to the next."""


@dataclass
class BenchConfig:
    rows: int = 200_000
    """Rows of the 1x data set (64 float features: 256 bytes a row)."""
    features: int = 64
    """Features per row (one list<float> column)."""
    shards: int = 8
    """Parquet files of the 1x data set; the larger one has `memory_scale` times as many, of the same size."""
    memory_scale: int = 4
    """The larger data set for the memory measure is this many times the 1x one."""
    models: list[ModelSize] = field(default_factory=lambda: [
        # the demo model: a few kFLOP a row, per-batch overhead dominates; ~0.5 s an epoch on 180,000 rows, so the
        # job's start-up (~20 s) is most of a run: two of them, to see how much one job differs from the next
        ModelSize("small", [64, 32], 8, epochs=6, jobs=2),
        ModelSize("large", [512, 256], 32, epochs=2),  # ~0.5 MFLOP a row forward: compute dominates; ~5 s an epoch
    ])
    """Model sizes; the last one is the compute-bound one whose ratios are the headline figures."""
    train_batch_sizes: list[int] = field(default_factory=lambda: [1024, 4096])
    """Training batch sizes tried for each model (pipeline and baseline alike)."""
    score_batch_sizes: list[int] = field(default_factory=lambda: [4096, 16384])
    """Scoring batch sizes tried for each model."""
    repeats: int = 3
    """Repeats of the ingest measure (median taken)."""
    score_repeats: int = 3
    """Repeats of each scoring measure (median taken), after one warm-up run per model."""
    num_cpus: Optional[int] = None
    """Logical CPUs of the local Ray (default: the machine's cores)."""
    cpus_per_worker: float = 1.0
    """CPUs (and torch threads) of the one training worker and of the scoring actor; the rest feed them."""
    e2e_rows: dict[str, int] = field(default_factory=lambda: {"small": 10_000, "medium": 1_000_000})
    """Rows of the end-to-end training tables (16 features, like ADBench's tables), by label."""
    e2e_features: int = 16
    """Features of the end-to-end training tables."""
    e2e_epochs: int = 5
    """Epochs of each end-to-end training run (early stopping off), pipeline and plain script alike."""
    large_shard_rows: int = 2_000_000
    """Rows of the large-shard ingest data set (64 features: 256 bytes a row)."""
    large_shard_mb: float = 128
    """Target shard size of the large-shard ingest data set, in MB of float32 features."""
    out_json: str = "bench-results.json"
    out_md: str = "bench-results.md"
    workdir: str = "bench-work"
    """Local scratch (configs, logs)."""


def preset(name: str) -> BenchConfig:
    if name == "full":
        return BenchConfig()
    if name == "tiny":  # the code path on thousands of rows, not the numbers (what the test runs)
        return BenchConfig(rows=4000, shards=2, repeats=1, score_repeats=1, e2e_epochs=2,
                           e2e_rows={"medium": 4000}, large_shard_rows=8000, large_shard_mb=1,
                           models=[ModelSize("small", [16], 4, epochs=2)],
                           train_batch_sizes=[256], score_batch_sizes=[1024])
    raise ValueError(f"unknown preset {name!r} (have: full, tiny)")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


# ------------------------------------------------------------------------------------------ ingest


def ray_read_rows(spec: InputSpec, storage: Storage, stats: Optional[list[str]] = None,
                  with_paths: bool = True) -> int:
    """Rows streamed to the driver through the pipeline's own reader (its Ray Data stats appended to `stats`)."""
    n = 0
    ds = read_dataset(spec, storage, with_paths=with_paths)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        n += batch.num_rows
    if stats is not None:
        stats.append(ds.stats())
    return n


def pyarrow_read_rows(spec: InputSpec, storage: Storage) -> int:
    """Rows read directly with pyarrow.dataset (multithreaded, in-process), same files and columns."""
    fs = storage.filesystem(spec.files[0])
    ds = pads.dataset([storage.resolve(f)[1] for f in spec.files], filesystem=fs, format="parquet")
    return sum(b.num_rows for b in ds.to_batches(columns=spec.columns))


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (0.0, 0.0)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def compare(pipeline: list[float], baseline: list[float], paired: bool = True) -> dict[str, Any]:
    """Medians of both sides' samples, their ratio, and its spread: with `paired` samples (the sides alternated
    repeat by repeat) the lowest and highest per-repeat ratio, else the band between the sides' quartiles."""
    p, b = _median(pipeline), _median(baseline)
    if paired:
        ratios = [_ratio(x, y) for x, y in zip(pipeline, baseline)]
        lo, hi = (min(ratios), max(ratios)) if ratios else (0.0, 0.0)
    else:
        (p1, p3), (b1, b3) = _quartiles(pipeline), _quartiles(baseline)
        lo, hi = _ratio(p1, b3), _ratio(p3, b1)
    return {"pipeline_rows_per_s": p, "baseline_rows_per_s": b, "ratio": _ratio(p, b), "ratio_spread": [lo, hi],
            "pipeline_samples": list(pipeline), "baseline_samples": list(baseline),
            "spread": "min-max of per-repeat ratios" if paired else "q1/q3 to q3/q1 of the samples"}


def best_of(ms: ModelSize, threads: int, by_bs: dict[str, Any]) -> dict[str, Any]:
    """One model's results: every batch size tried, and the one where the pipeline ran fastest up front."""
    best = max(by_bs, key=lambda k: by_bs[k]["pipeline_rows_per_s"])
    return {"model": dataclasses.asdict(ms), "threads": threads, "best_batch_size": int(best),
            "by_batch_size": by_bs, **{k: by_bs[best][k] for k in ("pipeline_rows_per_s", "baseline_rows_per_s",
                                                                     "ratio", "ratio_spread")}}


def _ratio_text(r: dict[str, Any]) -> str:
    lo, hi = r["ratio_spread"]
    return f"{r['ratio']:.2f}, spread {lo:.2f}-{hi:.2f}"


def _rows_per_s(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def _alternate(i: int, items: list) -> list:
    """`items` in order on even repeats, reversed on odd ones: a drift in the machine's load over the repeats
    weighs on every side alike, not on whichever always runs first."""
    return items if i % 2 == 0 else items[::-1]


def ray_floor_seconds(rows: int, blocks: int) -> float:
    """Seconds Ray Data takes to stream `rows` generated rows in `blocks` tasks to the driver: what planning,
    scheduling and handing blocks over cost before any file is read (the floor under `ray_read_rows`)."""
    import ray.data

    t0 = time.perf_counter()
    for _ in ray.data.range(rows, override_num_blocks=blocks).iter_batches(batch_format="pyarrow", batch_size=None):
        pass
    return time.perf_counter() - t0


def measure_ingest(spec: InputSpec, storage: Storage, repeats: int,
                   big: Optional[InputSpec] = None) -> dict[str, Any]:
    ray_read_rows(spec, storage)  # warm-up: Ray Data's first execution starts its worker processes
    ray_rps, pa_rps, no_paths, floor, stats = [], [], [], [], []
    for i in range(repeats):  # interleaved, so load on the machine hits both alike
        for measure in _alternate(i, [
                lambda: ray_rps.append(_rows_per_s(lambda: ray_read_rows(spec, storage, stats))),
                lambda: no_paths.append(_rows_per_s(lambda: ray_read_rows(spec, storage, with_paths=False))),
                lambda: pa_rps.append(_rows_per_s(lambda: pyarrow_read_rows(spec, storage))),
                lambda: floor.append(ray_floor_seconds(spec.num_rows, len(spec.files)))]):
            measure()
    out = {**compare(ray_rps, pa_rps), "rows": spec.num_rows,
           "files": len(spec.files), "profile": stats[-1].splitlines(),
           # what the `path` column (file names for error messages) costs the read
           "pipeline_without_paths_rows_per_s": _median(no_paths),
           # Ray Data's own cost: the same number of rows and tasks, generated instead of read
           "ray_data_floor_seconds": _median(floor),
           "baseline_seconds": spec.num_rows / _median(pa_rps),
           "pipeline": "ray.data.read_parquet (pipeline.read.read_dataset) -> iter_batches",
           "baseline": "pyarrow.dataset.to_batches, same files, same columns"}
    if big is not None:  # the larger data set: fixed costs weigh less
        ray_big, pa_big = [], []
        for i in range(repeats):
            for measure in _alternate(i, [lambda: ray_big.append(_rows_per_s(lambda: ray_read_rows(big, storage))),
                                          lambda: pa_big.append(_rows_per_s(lambda: pyarrow_read_rows(big, storage)))]):
                measure()
        out["larger_data"] = {**compare(ray_big, pa_big), "rows": big.num_rows, "files": len(big.files),
                              "ray_data_floor_seconds": ray_floor_seconds(big.num_rows, len(big.files))}
    return out


def ray_read_rows_v2(spec: InputSpec, storage: Storage) -> int:
    """Rows streamed to the driver through Ray 2.60's DataSourceV2 Parquet reader (splits files by row group)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    prev, ctx.use_datasource_v2 = ctx.use_datasource_v2, True
    try:
        ds = ray.data.read_parquet([storage.resolve(f)[1] for f in spec.files],
                                   filesystem=storage.filesystem(spec.files[0])).select_columns(spec.columns)
        return sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    finally:
        ctx.use_datasource_v2 = prev


def measure_large_shards(spec: InputSpec, storage: Storage, repeats: int, shard_mb: float) -> dict[str, Any]:
    """Ingest at real shard sizes: the pipeline's reader (V1) and the V2 reader, each vs pyarrow.dataset."""
    ray_read_rows(spec, storage)  # warm-up, as in measure_ingest
    v1, v2, base = [], [], []
    for i in range(repeats):
        for samples, fn in _alternate(i, [(v1, ray_read_rows), (v2, ray_read_rows_v2), (base, pyarrow_read_rows)]):
            samples.append(_rows_per_s(lambda: fn(spec, storage)))
    v2c = compare(v2, base)
    return {**compare(v1, base), "shard_mb": shard_mb, "rows": spec.num_rows, "files": len(spec.files),
            "v2_samples": v2, "v2_rows_per_s": v2c["pipeline_rows_per_s"], "v2_ratio": v2c["ratio"],
            "v2_ratio_spread": v2c["ratio_spread"],
            "pipeline": "read_dataset (Ray Data V1 ParquetDatasource, a task per file)",
            "v2": "ray.data.read_parquet with DataContext.use_datasource_v2 (row-group splits)"}


# ------------------------------------------------------------------------------------------ training


def train_tensors(spec: InputSpec, storage: Storage, mean, scale) -> torch.Tensor:
    """The training split, normalized, as one in-memory tensor: the plain loop's input."""
    split = SplitFeatures(spec.data, spec.num_features, "train")
    parts = []
    for f in spec.files:
        with storage.open_parquet(f) as pf:
            t = split(pf.read(columns=spec.columns))
        parts.append(t.column("x").combine_chunks().flatten().to_numpy().reshape(-1, spec.num_features))
    x = torch.from_numpy(np.concatenate(parts))
    return (x - torch.as_tensor(mean)) / torch.as_tensor(scale)


def plain_train(x: torch.Tensor, model_size: ModelSize, batch_size: int, epochs: int, threads: int,
                lr: float, seed: int = 0, weight_decay: float = 0.0) -> list[float]:
    """A plain PyTorch loop over in-memory tensors: steady-state rows/s per epoch (first batch timed apart).

    Each epoch visits the rows in a fresh random order, a batch gathered at a time, as the pipeline's cached
    epochs do (slicing in file order instead would skip the gather, ~0.3 ms of a 1,024-row batch's ~7 ms on the
    small model, and train on the same batches every epoch)."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = build_model(x.shape[1], hidden_dims=model_size.hidden_dims, latent_dim=model_size.latent_dim)
        opt = make_optimizer(model.parameters(), lr, weight_decay)  # the pipeline's own (fused AdamW)
        model.train()
        out = []
        for _ in range(epochs):
            t_first, rows = None, 0
            order = torch.randperm(len(x))
            for i in range(0, len(x), batch_size):
                xb = x[order[i:i + batch_size]]
                loss = torch.mean((model(xb) - xb) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if t_first is None:
                    t_first = time.perf_counter()
                else:
                    rows += len(xb)
            out.append(rows / max(time.perf_counter() - t_first, 1e-9))
        return out
    finally:
        torch.set_num_threads(prev_threads)


def bench_config(bc: BenchConfig, run_name: str, data_uri: str, model_size: ModelSize,
                 batch_size: int = 1024, score_batch_size: int = 4096, epochs: Optional[int] = None) -> Config:
    """The job config the benchmark runs the real jobs with (`epochs`: the model size's)."""
    threads = max(1, int(bc.cpus_per_worker))
    epochs = epochs or model_size.epochs
    return Config(
        run=RunSection(name=run_name, num_cpus=bc.num_cpus),
        data=DataSection(input=data_uri, features="features", id_columns=["id"], timestamp_column="event_time"),
        # one model, the plain loss: what the plain loops train (the defaults' ensemble of 5 and trimmed loss
        # multiply the work per step; `make eval` measures what they buy)
        model=ModelSection(hidden_dims=list(model_size.hidden_dims), latent_dim=model_size.latent_dim, ensemble=1),
        train=TrainSection(epochs=epochs, batch_size=batch_size, num_workers=1, trim_fraction=0.0,
                           cpus_per_worker=bc.cpus_per_worker, patience=epochs + 1, max_failures=0),
        score=ScoreSection(batch_size=score_batch_size, concurrency=1, cpus_per_actor=float(threads)),
        artifacts=ArtifactsSection(uri=f"s3://{BUCKET}/artifacts"),
        output=OutputSection(uri=f"s3://{BUCKET}/output/{run_name}"),
    )


def measure_training(bc: BenchConfig, storage: Storage, data_uri: str) -> dict[str, Any]:
    """Per model and batch size: train_job's steady-state per-worker rows/s vs the plain loop's, per epoch.

    In rounds over every model and batch size (`ModelSize.jobs` of them); in each, the plain loop runs half its
    epochs right before the job and half right after, so load that comes or goes during the job weighs on both."""
    from pipeline.jobs import train_job
    from pipeline.sizing import step_budget

    threads = max(1, int(bc.cpus_per_worker))
    # The training split as the workers see it; normalized with its own statistics (the step's cost does not
    # depend on the values), so the plain loop can run before the first job.
    data = bench_config(bc, "plain", data_uri, bc.models[0]).data
    spec = inspect_input(data, storage)
    raw = train_tensors(spec, storage, np.zeros(spec.num_features, np.float32),
                        np.ones(spec.num_features, np.float32))
    x = (raw - raw.mean(0)) / raw.std(0).clamp_min(1e-6)
    del raw
    runs: dict[tuple[str, int], dict[str, list]] = {}
    for rnd in range(max(ms.jobs for ms in bc.models)):
        for ms in (m for m in bc.models if rnd < m.jobs):
            for bs in bc.train_batch_sizes:
                cfg = bench_config(bc, f"bench-{ms.name}-bs{bs}", data_uri, ms, batch_size=bs)
                tr = cfg.train
                batch, _ = step_budget(tr.batch_size, len(x) // tr.num_workers, tr.epochs, tr.steps)
                r = runs.setdefault((ms.name, bs), {"pipe": [], "base": [], "hist": [], "rounds": []})
                if rnd == 0:  # warm-up: the first steps of a new model and batch shape in this process
                    plain_train(x[:batch * 8], ms, batch, 1, threads, tr.lr, weight_decay=tr.weight_decay)
                before = ms.epochs // 2
                base = plain_train(x, ms, batch, before, threads, tr.lr, seed=rnd,
                                   weight_decay=tr.weight_decay) if before else []
                summary = train_job(cfg, storage, overwrite=True)
                if summary.manifest["metrics"]["batch_size"] != batch:
                    raise RuntimeError(f"the job trained with batch size {summary.manifest['metrics']['batch_size']}"
                                       f", the plain loop with {batch}")
                base += plain_train(x, ms, batch, ms.epochs - before, threads, tr.lr, seed=rnd,
                                    weight_decay=tr.weight_decay)
                hist = summary.manifest["history"]
                pipe = [float(h["worker_rows_per_s"]) for h in hist]
                r["pipe"] += pipe
                r["base"] += base
                r["hist"] += hist
                r["rounds"].append(_ratio(_median(pipe), _median(base)))
                r["run_uri"] = summary.run_uri
                print(f"[bench] training {ms.name} bs={bs} job {rnd + 1}/{ms.jobs}: pipeline "
                      f"{_median(pipe):,.0f} rows/s, plain {_median(base):,.0f} rows/s ({r['rounds'][-1]:.2f})",
                      flush=True)
    out: dict[str, Any] = {}
    for ms in bc.models:
        by_bs: dict[str, Any] = {}
        for bs in bc.train_batch_sizes:
            r = runs[(ms.name, bs)]
            hist = r["hist"]
            by_bs[str(bs)] = res = {
                **compare(r["pipe"], r["base"], paired=False),
                "job_ratios": r["rounds"], "epochs_per_job": ms.epochs, "jobs": ms.jobs,
                "first_batch_seconds": [float(h["first_batch_seconds"]) for h in hist],
                "data_wait_fraction": _median([float(h.get("data_wait_fraction", 0.0)) for h in hist]),
                "epoch_seconds": [float(h["epoch_seconds"]) for h in hist],
                "train_rows": int(hist[0]["train_rows"]), "run_uri": r["run_uri"],
            }
            print(f"[bench] training {ms.name} bs={bs}: pipeline {res['pipeline_rows_per_s']:,.0f} rows/s, plain "
                  f"{res['baseline_rows_per_s']:,.0f} rows/s ({_ratio_text(res)}), data wait "
                  f"{res['data_wait_fraction']:.1%}", flush=True)
        out[ms.name] = best_of(ms, threads, by_bs)
    return out


def plain_script(cfg: Config, storage: Storage, model_size: ModelSize, batch_size: int, epochs: int,
                 threads: int, weights_uri: str) -> float:
    """What a user would write without the pipeline: pyarrow read of the training rows, normalize, the same
    epochs of the same model, the weights written to the same server. Returns its wall seconds."""
    t0 = time.perf_counter()
    spec = inspect_input(cfg.data, storage)
    x = train_tensors(spec, storage, np.zeros(spec.num_features, np.float32),
                      np.ones(spec.num_features, np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    plain_train((x - mean) / std, model_size, batch_size, epochs, threads, cfg.train.lr)
    fs, path = storage.resolve(weights_uri)
    with fs.open_output_stream(path) as fh:
        torch.save({"mean": mean, "std": std}, fh)  # plain_train's model is discarded: its size is what counts
    return time.perf_counter() - t0


def measure_training_end_to_end(bc: BenchConfig, storage: Storage, uris: dict[str, str]) -> dict[str, Any]:
    """Per table: `train_job` wall time vs the plain script, same epochs; the per-epoch fixed cost (epoch wall
    time, the previous report included, minus the training steps: `fixed_seconds` in the history)."""
    from pipeline.jobs import train_job

    out: dict[str, Any] = {}
    threads = max(1, int(bc.cpus_per_worker))
    ms = bc.models[0]
    for label, uri in uris.items():
        cfg = bench_config(bc, f"e2e-{label}", uri, ms, batch_size=bc.train_batch_sizes[-1])
        cfg.train = dataclasses.replace(cfg.train, epochs=bc.e2e_epochs, patience=bc.e2e_epochs + 1)
        t0 = time.perf_counter()
        summary = train_job(cfg, storage, overwrite=True)
        pipe = time.perf_counter() - t0
        hist = summary.manifest["history"]
        base = plain_script(cfg, storage, ms, summary.manifest["metrics"]["batch_size"], bc.e2e_epochs, threads,
                            f"s3://{BUCKET}/plain-{label}/weights.pt")
        out[label] = r = {"pipeline_seconds": pipe, "baseline_seconds": base, "ratio": _ratio(base, pipe),
                          "epochs": len(hist), "rows": bc.e2e_rows[label],
                          "per_epoch_fixed_seconds": _median([float(h["fixed_seconds"]) for h in hist]),
                          "fixed_seconds": [float(h["fixed_seconds"]) for h in hist],
                          # the part of the fixed cost that is the validation pass (it grows with the rows)
                          "validation_seconds": [float(h.get("validation_seconds", 0.0)) for h in hist],
                          "validation_rows": int(hist[-1]["val_rows"]),
                          "epoch_seconds": [float(h["epoch_seconds"]) for h in hist],
                          "step_seconds": sum(float(h["step_seconds"]) for h in hist),
                          "phases": summary.phases}
        print(f"[bench] training end to end {label} ({r['rows']:,} rows, {r['epochs']} epochs): pipeline "
              f"{pipe:.1f}s, plain script {base:.1f}s ({r['ratio']:.2f}), fixed cost "
              f"{r['per_epoch_fixed_seconds']:.2f}s an epoch", flush=True)
    return out


# ------------------------------------------------------------------------------------------ scoring


def plain_score(cfg: Config, storage: Storage, spec: InputSpec, model_run_uri: str, output_uri: str,
                threads: int) -> float:
    """pyarrow read -> the same BatchScorer -> pyarrow write, file by file, with the CPU budget of the scoring
    worker it is compared with: `threads` torch threads and `threads` Arrow CPU threads (Ray sets
    OMP_NUM_THREADS to a task's CPUs, and Arrow sizes its CPU pool by it). Returns rows/s."""
    from pipeline.predictor import Predictor
    from pipeline.scorer import BatchScorer

    prev_threads, prev_arrow = torch.get_num_threads(), pa.cpu_count()
    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)
    try:
        t0 = time.perf_counter()
        predictor = BatchScorer(Predictor.from_artifact(storage, model_run_uri), cfg.data,
                                dt.datetime.now(dt.timezone.utc))
        rows = 0
        for i, f in enumerate(spec.files):
            with storage.open_parquet(f) as pf:
                table = pf.read(columns=spec.columns)
            out = pa.concat_tables([predictor(b) for b in table.to_batches(cfg.score.batch_size)])
            ofs, opath = storage.resolve(join_uri(output_uri, f"part-{i:05d}.parquet"))
            with ofs.open_output_stream(opath) as fh:
                pq.write_table(out, fh)
            rows += out.num_rows
        return rows / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev_threads)
        pa.set_cpu_count(prev_arrow)


def measure_scoring(bc: BenchConfig, storage: Storage, data_uri: str, training: dict[str, Any]) -> dict[str, Any]:
    """Per model and scoring batch size: `score` end to end vs the plain loop, interleaved, median of repeats."""
    from pipeline.score import score

    out: dict[str, Any] = {}
    threads = max(1, int(bc.cpus_per_worker))
    for ms in bc.models:
        run_uri = training[ms.name]["by_batch_size"][str(training[ms.name]["best_batch_size"])]["run_uri"]
        # A first run starts the Ray worker processes (and their torch import) that later runs reuse, as
        # the plain loop reuses this interpreter: timed, reported apart, not in the medians.
        warm = bench_config(bc, f"score-{ms.name}-warmup", data_uri, ms, score_batch_size=bc.score_batch_sizes[0])
        first = score(warm, storage, run_uri, warm.output.uri)
        by_bs: dict[str, Any] = {}
        for bs in bc.score_batch_sizes:
            cfg = bench_config(bc, f"score-{ms.name}-bs{bs}", data_uri, ms, score_batch_size=bs)
            spec = inspect_input(cfg.data, storage)
            pipe, base, files, phases = [], [], 0, []
            for i in range(bc.score_repeats):
                for side in _alternate(i, ["pipeline", "baseline"]):
                    if side == "baseline":
                        base.append(plain_score(cfg, storage, spec, run_uri, f"{cfg.output.uri}-plain", threads))
                        continue
                    res = score(cfg, storage, run_uri, cfg.output.uri)
                    pipe.append(res.input_rows / res.seconds)
                    files = len(res.files)
                    phases.append(res.phases)
            by_bs[str(bs)] = r = {**compare(pipe, base), "rows": spec.num_rows, "output_files": files,
                                  "input_files": len(spec.files),
                                  # where the pipeline's time went (median per phase over the repeats)
                                  "phases": {k: _median([p[k] for p in phases]) for k in phases[0]}}
            print(f"[bench] scoring {ms.name} bs={bs}: pipeline {r['pipeline_rows_per_s']:,.0f} rows/s, plain "
                  f"{r['baseline_rows_per_s']:,.0f} rows/s ({_ratio_text(r)})", flush=True)
        out[ms.name] = best_of(ms, threads, by_bs)
        out[ms.name]["first_run"] = {"seconds": first.seconds, "phases": first.phases,
                                     "rows_per_s": first.input_rows / first.seconds}
    return out


# ------------------------------------------------------------------------------------------ memory


def tree_memory_mb(proc) -> tuple[float, str]:
    """Memory of a process and all its descendants, in MB: the sum of PSS (shared pages, such as Ray's
    object store, split between the processes mapping them, so nothing is counted twice), else of RSS."""
    import psutil

    total, kind = 0, "pss"
    for p in [proc, *proc.children(recursive=True)]:
        try:
            try:
                total += p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += p.memory_info().rss
                kind = "rss"
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return total / 2**20, kind


def peak_tree_memory(cmd: list[str], env: dict[str, str], log_path: Path, interval: float = 0.2,
                     timeout: float = 600) -> dict[str, Any]:
    """Run `cmd`, sampling its process tree's memory until it exits. Raises if it fails."""
    from benchmarks.sampling import sample_while_running

    seen = {"peak": 0.0, "kind": "pss", "samples": 0}

    def sample(ps) -> None:
        mb, seen["kind"] = tree_memory_mb(ps)
        seen["peak"], seen["samples"] = max(seen["peak"], mb), seen["samples"] + 1

    seconds = sample_while_running(cmd, env, log_path, sample, interval, timeout)
    return {"peak_mb": seen["peak"], "measure": seen["kind"], "samples": seen["samples"], "seconds": seconds}


def measure_memory(bc: BenchConfig, endpoint: str, uris: dict[str, str], rows: dict[str, int], run_name: str,
                   model_size: ModelSize, workdir: Path) -> dict[str, Any]:
    """Peak memory of the scoring job (`python -m jobs.score`, its own local Ray) on 1x and Nx the data."""
    import yaml

    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RAY_ADDRESS", None)
    res = {}
    for label in ("1x", f"{bc.memory_scale}x"):
        cfg = bench_config(bc, run_name, uris[label], model_size)
        cfg.output.uri = f"s3://{BUCKET}/output/memory-{label}"
        path = workdir / f"score-{label}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        cmd = [sys.executable, "-m", "jobs.score", "--config", str(path)]
        res[label] = peak_tree_memory(cmd, env, workdir / f"score-{label}.log")
        print(f"[bench] memory {label} ({rows[label]} rows): peak {res[label]['peak_mb']:,.0f} MB "
              f"({res[label]['measure']})", flush=True)
    big = f"{bc.memory_scale}x"
    return {"peak_mb_1x": res["1x"]["peak_mb"], f"peak_mb_{big}": res[big]["peak_mb"],
            "ratio": _ratio(res[big]["peak_mb"], res["1x"]["peak_mb"]),
            "rows_1x": rows["1x"], f"rows_{big}": rows[big], "scale": bc.memory_scale,
            "measure": res["1x"]["measure"], "model": model_size.name,
            "what": "sum over the scoring job's process tree (driver, raylet, GCS, workers) of PSS"}


# ------------------------------------------------------------------------------------------ report


def headline(section: dict[str, Any], model: str) -> dict[str, Any]:
    s = section[model]
    return {"pipeline_rows_per_s": s["pipeline_rows_per_s"], "baseline_rows_per_s": s["baseline_rows_per_s"],
            "ratio": s["ratio"], "ratio_spread": s["ratio_spread"], "model": model, "batch_size": s["best_batch_size"],
            "by_model": section}


def limits(results: dict[str, Any]) -> dict[str, str]:
    """A line per missed target naming the measured limit (the profile figures are in the JSON next to it)."""
    out = {}
    ing = results["ingest"]
    if ing["ratio"] < TARGETS["ingest"]:
        larger = ing.get("larger_data")
        at_big = (f"; on {larger['rows']:,} rows in {larger['files']} files the ratio is {larger['ratio']:.2f}"
                  if larger else "")
        out["ingest"] = (f"ratio {ing['ratio']:.2f} < {TARGETS['ingest']}: pyarrow reads the {ing['rows']:,} rows in "
                         f"{ing['baseline_seconds']:.2f}s in-process, while Ray Data alone (the same rows and "
                         f"{ing['files']} tasks, generated instead of read) takes {ing['ray_data_floor_seconds']:.2f}s: "
                         "planning, a task per file, blocks through the object store" + at_big +
                         "; per-operator times in ingest.profile")
    tr = results["training"]
    if tr["ratio"] < TARGETS["training"]:
        r = tr["by_model"][tr["model"]]["by_batch_size"][str(tr["batch_size"])]
        wait = r["data_wait_fraction"]
        why = (f"the worker waited for data {wait:.0%} of its steady-state time: ingest (Ray Data tasks and the "
               "S3 server on the CPUs left over) does not keep up" if wait > 0.1 else
               f"the worker waited for data only {wait:.0%} of the time: the cost is in the worker's own "
               "per-step work (batch assembly, normalization, DDP wrapper) competing for its CPU")
        out["training"] = f"ratio {tr['ratio']:.2f} < {TARGETS['training']}: {why}"
    sc = results["scoring"]
    if sc["ratio"] < TARGETS["scoring"]:
        r = sc["by_model"][sc["model"]]["by_batch_size"][str(sc["batch_size"])]
        extra = r["rows"] / sc["pipeline_rows_per_s"] - r["rows"] / sc["baseline_rows_per_s"]
        ph = r.get("phases", {})
        fixed = sum(v for k, v in ph.items() if k != "score_and_write")
        out["scoring"] = (f"ratio {sc['ratio']:.2f} < {TARGETS['scoring']}: the job takes {extra:.1f}s longer for "
                          f"{r['rows']:,} rows than the plain loop's {r['rows'] / sc['baseline_rows_per_s']:.1f}s; "
                          f"read+score+write took {ph.get('score_and_write', 0):.1f}s (one fused Ray task per file, "
                          f"one at a time), checks, row verification and publish {fixed:.1f}s more; the first "
                          f"run, which starts Ray's worker processes, took {sc['by_model'][sc['model']]['first_run']['seconds']:.1f}s")
    lg = results.get("ingest_large_shards")
    if lg and lg["ratio"] < TARGETS["ingest_large_shards"]:
        out["ingest_large_shards"] = (f"ratio {lg['ratio']:.2f} < {TARGETS['ingest_large_shards']} with "
                                      f"{lg['files']} shards of ~{lg['shard_mb']:g} MB (V2 reader: "
                                      f"{lg['v2_ratio']:.2f}); per-file parallelism is capped by the shard count")
    for label, r in results.get("training_end_to_end", {}).items():
        if r["ratio"] < TARGETS["training_end_to_end"] or r["per_epoch_fixed_seconds"] > TARGETS["per_epoch_fixed_seconds"]:
            out[f"training_end_to_end.{label}"] = (
                f"ratio {r['ratio']:.2f} (target >= {TARGETS['training_end_to_end']}), fixed cost "
                f"{r['per_epoch_fixed_seconds']:.2f}s an epoch (target <= {TARGETS['per_epoch_fixed_seconds']}): "
                f"{r['pipeline_seconds'] - r['baseline_seconds']:.1f}s more than the plain script over "
                f"{r['epochs']} epochs, of which {r['epochs'] * r['per_epoch_fixed_seconds']:.1f}s per-epoch fixed "
                f"cost ({_median(r.get('validation_seconds', [])):.2f}s an epoch of it the validation pass over "
                f"{r.get('validation_rows', 0):,} rows); the job's phases: "
                + ", ".join(f"{k} {v:.1f}s" for k, v in r.get("phases", {}).items())
                + f" (training steps {r.get('step_seconds', 0):.1f}s)")
    m = results["memory"]["ratio"]
    if m > TARGETS["memory"]:
        out["memory"] = f"ratio {m:.2f} > target {TARGETS['memory']}"
    return out


def _spread_cell(r: dict[str, Any], key: str = "ratio_spread") -> str:
    lo, hi = r[key]
    return f"{lo:.2f}-{hi:.2f}"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    cfg = results["config"]
    lines = [
        f"Measured {env['date']} on {env['cpus']} CPUs ({env['platform']}), load average {env['load_before']} "
        f"before / {env['load_after']} after, {env.get('seconds', 0):.0f} s in all, torch {env['torch']} "
        f"({env['torch_threads']} thread per worker), ray {env['ray']}; {cfg['rows']:,} rows x {cfg['features']} "
        "features on a loopback S3 server (moto). Ratio: median over median; spread: the lowest and highest "
        f"per-repeat ratio ({cfg['repeats']} ingest and {cfg['score_repeats']} scoring repeats, the sides "
        "alternating), for training the band between the quartiles of the job's epochs and the plain loop's ("
        + ", ".join(f"{m['name']}: {m['jobs']} x {m['epochs']} epochs a side" for m in cfg["models"]) + ").",
        "",
        "| measure | model | batch | pipeline rows/s | baseline rows/s | ratio | spread | target |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    ing = results["ingest"]
    lines.append(f"| ingest (Ray Data vs pyarrow.dataset) | - | - | {ing['pipeline_rows_per_s']:,.0f} | "
                 f"{ing['baseline_rows_per_s']:,.0f} | {ing['ratio']:.2f} | {_spread_cell(ing)} | "
                 f">= {TARGETS['ingest']} |")
    if "larger_data" in ing:
        lg = ing["larger_data"]
        lines.append(f"| ingest, {lg['rows']:,} rows ({lg['files']} files) | - | - | {lg['pipeline_rows_per_s']:,.0f} | "
                     f"{lg['baseline_rows_per_s']:,.0f} | {lg['ratio']:.2f} | {_spread_cell(lg)} | "
                     "(not the headline) |")
    lg = results.get("ingest_large_shards")
    if lg:
        for name, rps, ratio, key in (("V1, the pipeline's", lg["pipeline_rows_per_s"], lg["ratio"], "ratio_spread"),
                                      ("V2", lg["v2_rows_per_s"], lg["v2_ratio"], "v2_ratio_spread")):
            lines.append(f"| ingest, {lg['rows']:,} rows in {lg['files']} shards of ~{lg['shard_mb']:g} MB (Ray Data "
                         f"{name} reader) | - | - | {rps:,.0f} | {lg['baseline_rows_per_s']:,.0f} | {ratio:.2f} | "
                         f"{_spread_cell(lg, key)} | >= {TARGETS['ingest_large_shards']} |")
    for key, label in (("training", "training, per worker (vs plain PyTorch loop)"),
                       ("scoring", "scoring, end to end (vs plain pyarrow+PyTorch loop)")):
        for model, s in results[key]["by_model"].items():
            for bs, r in s["by_batch_size"].items():
                best = " (best)" if int(bs) == s["best_batch_size"] else ""
                lines.append(f"| {label} | {model} | {bs}{best} | {r['pipeline_rows_per_s']:,.0f} | "
                             f"{r['baseline_rows_per_s']:,.0f} | {r['ratio']:.2f} | {_spread_cell(r)} | "
                             f">= {TARGETS[key]} |")
    e2e = results.get("training_end_to_end")
    if e2e:
        lines += ["", "| training end to end (train_job vs plain script, same epochs) | rows | epochs | pipeline s | "
                      "plain s | ratio | target | fixed s/epoch | target |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in e2e.items():
            lines.append(f"| {label} | {r['rows']:,} | {r['epochs']} | {r['pipeline_seconds']:.1f} | "
                         f"{r['baseline_seconds']:.1f} | {r['ratio']:.2f} | >= {TARGETS['training_end_to_end']} | "
                         f"{r['per_epoch_fixed_seconds']:.2f} | <= {TARGETS['per_epoch_fixed_seconds']} |")
    mem = results["memory"]
    scale = mem["scale"]
    lines += [
        "",
        "| memory (scoring job, whole process tree, PSS) | 1x | " + f"{scale}x | ratio | target |",
        "|---|---:|---:|---:|---:|",
        f"| peak MB ({mem['rows_1x']:,} vs {mem[f'rows_{scale}x']:,} rows) | {mem['peak_mb_1x']:,.0f} | "
        f"{mem[f'peak_mb_{scale}x']:,.0f} | {mem['ratio']:.2f} | <= {TARGETS['memory']} |",
    ]
    loads = env.get("stage_load_after", {})
    if loads:
        busy = [k for k, v in loads.items() if v > 2 * env["cpus"]]  # the bench alone keeps ~the cores busy
        lines += ["", "Load average (1 minute) at the end of each stage: "
                  + ", ".join(f"{k} {v:g}" for k, v in loads.items()) + "."
                  + (f" Above twice the {env['cpus']} CPUs after {', '.join(busy)}: other work competed for the CPUs, "
                     "which costs the pipeline (several processes: driver, Ray workers, raylet, the S3 server) more "
                     "than the one-process baselines, so those ratios read low; compare them with a run at a "
                     "similar load." if busy else "")]
    if results["limits"]:
        lines += ["", "Targets not reached: " + "; ".join(f"{k}: {v}" for k, v in results["limits"].items())]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import ray

    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
            "platform": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "pyarrow": pa.__version__,
            "load_before": round(os.getloadavg()[0], 2), "torch_threads": 1}


# ------------------------------------------------------------------------------------------ the run


def run_benchmark(bc: BenchConfig) -> dict[str, Any]:
    import ray

    from pipeline.cluster import connect
    from tests.loopback_s3 import LoopbackS3
    from pipeline.sample import write_sample

    t_start = time.perf_counter()
    workdir = Path(bc.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["torch_threads"] = max(1, int(bc.cpus_per_worker))
    stages: dict[str, float] = {}
    loads: dict[str, float] = {}
    env["stage_seconds"], env["stage_load_after"] = stages, loads

    def done(name: str, since: float) -> None:
        """A stage's seconds, and the 1-minute load average at its end (other work on the machine shows there)."""
        stages[name] = round(time.perf_counter() - since, 1)
        loads[name] = round(os.getloadavg()[0], 2)
    results: dict[str, Any] = {"config": dataclasses.asdict(bc), "environment": env, "targets": TARGETS}
    with LoopbackS3(log_dir=str(workdir)) as s3:
        s3.create_bucket(BUCKET)
        storage = Storage(StorageSection(endpoint_url=s3.endpoint))
        big = f"{bc.memory_scale}x"
        uris = {"1x": f"s3://{BUCKET}/data-1x", big: f"s3://{BUCKET}/data-{big}"}
        rows = {"1x": bc.rows, big: bc.rows * bc.memory_scale}
        shards = {"1x": bc.shards, big: bc.shards * bc.memory_scale}
        for label in uris:
            write_sample(uris[label], storage, rows=rows[label], shards=shards[label], features=bc.features,
                         seed=1 if label == "1x" else 2)
        e2e_uris = {label: f"s3://{BUCKET}/e2e-{label}" for label in bc.e2e_rows}
        for i, (label, n) in enumerate(bc.e2e_rows.items()):
            write_sample(e2e_uris[label], storage, rows=n, shards=max(1, n // 250_000),
                         features=bc.e2e_features, seed=10 + i)
        large_uri = f"s3://{BUCKET}/data-large-shards"
        write_sample(large_uri, storage, rows=bc.large_shard_rows, features=bc.features, seed=3,
                     shards=max(1, round(bc.large_shard_rows * bc.features * 4 / (bc.large_shard_mb * 1e6))))
        done("data", t_start)
        print(f"[bench] data written: {rows} rows ({stages['data']:.0f}s)", flush=True)

        started_ray = not ray.is_initialized()  # a test may share its session's cluster: leave that one up
        connect(bc.num_cpus or os.cpu_count())
        try:
            data = bench_config(bc, "ingest", uris["1x"], bc.models[0]).data
            spec = inspect_input(data, storage)
            big_spec = inspect_input(dataclasses.replace(data, input=uris[big]), storage)
            stage = time.perf_counter()
            results["ingest"] = measure_ingest(spec, storage, bc.repeats, big_spec)
            done("ingest", stage)
            print(f"[bench] ingest: Ray Data {results['ingest']['pipeline_rows_per_s']:,.0f} rows/s, "
                  f"pyarrow {results['ingest']['baseline_rows_per_s']:,.0f} rows/s "
                  f"({_ratio_text(results['ingest'])})", flush=True)
            stage = time.perf_counter()
            large = inspect_input(dataclasses.replace(data, input=large_uri), storage)
            results["ingest_large_shards"] = measure_large_shards(large, storage, bc.repeats, bc.large_shard_mb)
            done("ingest_large_shards", stage)
            stage = time.perf_counter()
            results["training_end_to_end"] = measure_training_end_to_end(bc, storage, e2e_uris)
            done("training_end_to_end", stage)
            stage = time.perf_counter()
            training = measure_training(bc, storage, uris["1x"])
            done("training", stage)
            stage = time.perf_counter()
            scoring = measure_scoring(bc, storage, uris["1x"], training)
            done("scoring", stage)
        finally:
            if started_ray:
                ray.shutdown()
        headline_model = bc.models[-1].name
        results["training"] = headline(training, headline_model)
        results["scoring"] = headline(scoring, headline_model)
        mem_model = bc.models[-1]
        mem_run = f"bench-{mem_model.name}-bs{training[mem_model.name]['best_batch_size']}"
        stage = time.perf_counter()
        results["memory"] = measure_memory(bc, s3.endpoint, uris, rows, mem_run, mem_model, workdir)
        done("memory", stage)
    env["load_after"] = round(os.getloadavg()[0], 2)
    env["seconds"] = round(time.perf_counter() - t_start, 1)
    results["limits"] = limits(results)
    Path(bc.out_json).write_text(json.dumps(results, indent=2, sort_keys=False))
    Path(bc.out_md).write_text(markdown(results))
    print(f"[bench] done in {env['seconds']:.0f}s: {bc.out_json}, {bc.out_md}", flush=True)
    return results
