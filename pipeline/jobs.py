"""The three jobs, as library calls: train a model, score with it, or both. Entry points in `jobs/` are thin.

    train_job(cfg)  -> TrainSummary   check input, normalization pass, TorchTrainer, threshold, artifact
    score_job(cfg)  -> ScoreResult    score with a stored model into `output.uri/run_date=…/`, publish atomically
    dry_run(cfg)    -> list[str]      check config, storage access, input schema (and the model) without Ray
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipeline.artifacts import MANIFEST, model_dir, read_manifest, save_artifact
from pipeline.cluster import connect
from pipeline.config import AUTO, Config
from pipeline.data import InputSpec, compute_moments, inspect_input, normalization_stats
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.kinds import build_model
from pipeline.metrics import output_error_counts
from pipeline.multinode import check_shared_storage
from pipeline.report import scoring_report, training_report
from pipeline.resources import check_job, data_phase, training_phase
from pipeline.schedule import (parse_run_date, plan_incremental, record_scored, report_uri, resolve_model_run,
                               run_date_uri)
from pipeline.score import ScoreResult, check_features_match, score
from pipeline.sizing import resolve_model, still_improving
from pipeline.sketch import error_histogram_of
from pipeline.storage import Storage, join_uri
from pipeline.train import fit
from pipeline.validation import validation_errors, validation_projection
from pipeline.watchdog import watch

PREPARE = "prepare.json"
REJECTS = "rejects"  # <run>/rejects/: training rows dropped by data.nan_policy=drop, with the reason


@dataclass
class TrainSummary:
    run_uri: str
    model_version: str
    train_rows: int
    validation_rows: int
    rejected_rows: int
    epochs_run: int
    best_epoch: int
    first_val_loss: float
    best_val_loss: float
    final_train_loss: float
    threshold: float
    seconds: float
    manifest: dict[str, Any]
    still_improving: Optional[str] = None
    """Set when the run hit its epoch limit with the validation loss still falling (what to raise)."""


def _prepare(cfg: Config, storage: Storage, spec: InputSpec) -> dict[str, Any]:
    """Normalization statistics and split counts; stored with the run so a resumed run reuses them."""
    uri = join_uri(cfg.run_uri, PREPARE)
    key = {"input": spec.uri, "num_rows": spec.num_rows, "features": spec.feature_names,
           "validation_fraction": cfg.data.validation_fraction, "id_columns": cfg.data.id_columns,
           "nan_policy": cfg.data.nan_policy}
    if storage.exists(uri):
        prev = storage.read_json(uri)
        if prev.get("key") == key:
            print(f"[prepare] reusing normalization statistics from {uri}", flush=True)
            return prev
    t0 = time.perf_counter()
    rejects_uri = join_uri(cfg.run_uri, REJECTS)
    storage.delete_dir(rejects_uri)  # a recomputed pass rewrites them all
    moments, n_val, n_rej = compute_moments(spec, cfg.data, storage, rejects_uri)
    if moments.n == 0:
        raise InputError(f"data.input {spec.uri}: no training rows ({n_val} validation, {n_rej} rejected)")
    mean, scale = normalization_stats(moments)
    prep = {"key": key, "mean": mean.tolist(), "scale": scale.tolist(), "train_rows": moments.n,
            "validation_rows": n_val, "rejected_rows": n_rej, "rejects": rejects_uri if n_rej else None}
    storage.write_json(uri, prep)
    print(f"[prepare] {spec.num_rows} rows in {len(spec.files)} files: {moments.n} train, {n_val} validation, "
          f"{n_rej} rejected; statistics in {time.perf_counter() - t0:.1f}s", flush=True)
    return prep


def check_train(cfg: Config, storage: Storage, overwrite: bool = False, output: bool = False) -> InputSpec:
    """Everything training can check before starting Ray: the run's state, that the artifact (and with
    `output`, the output) location is writable, and the input's schema. Deletes the old run on overwrite."""
    run_uri = cfg.run_uri
    manifest_uri = join_uri(model_dir(run_uri), MANIFEST)
    for uri in (run_uri, cfg.data.input) + ((cfg.output.uri,) if output else ()):
        storage.check_bucket(uri)
    finished = storage.exists(manifest_uri)
    if finished and not overwrite:
        raise PipelineError(f"run {cfg.run.name}: already trained ({manifest_uri} exists); "
                            "pass --overwrite to replace it or choose another run.name")
    storage.check_writable(run_uri)
    if output:
        storage.check_writable(cfg.output.uri)
    spec = inspect_input(cfg.data, storage)
    table_model(cfg, spec)  # checks explicit sizes against the input's width
    if finished:  # only once the new run's input has passed its checks
        print(f"[train] --overwrite: deleting the previous run at {run_uri}", flush=True)
        storage.delete_dir(run_uri)
    return spec


def table_model(cfg: Config, spec: InputSpec):
    """The model section with `auto` sizes chosen for this input (pipeline/sizing.py); explicit ones checked."""
    return resolve_model(cfg.model, spec.num_features, cfg.train.algorithm)


def train_job(cfg: Config, storage: Optional[Storage] = None, overwrite: bool = False,
              check_output: bool = False) -> TrainSummary:
    """`check_output`: also check that `output.uri` is writable before training (for train-then-score)."""
    start = time.perf_counter()
    storage = storage or Storage(cfg.storage)
    run_uri = cfg.run_uri
    spec = check_train(cfg, storage, overwrite, output=check_output)
    requested, cfg = cfg, dataclasses.replace(cfg, model=table_model(cfg, spec))
    auto = [k for k in ("hidden_dims", "latent_dim", "ensemble") if getattr(requested.model, k) == AUTO]
    if auto:
        print(f"[train] model sizes for {spec.num_features} features: "
              f"hidden_dims {cfg.model.hidden_dims}, latent_dim {cfg.model.latent_dim}, ensemble {cfg.model.ensemble} "
              f"({', '.join(auto)}: auto)",
              flush=True)
    connect(cfg.run.num_cpus)  # only once the cheap checks (config, storage, schema) have passed
    cfg = check_job(cfg, "train")  # before any data is read: requests the cluster can never meet end here
    check_shared_storage(cfg, ("data.input", "artifacts.uri") + (("output.uri",) if check_output else ()))
    stall_s = cfg.train.stall_timeout_s
    with watch(stall_s, "prepare", data_phase(cfg, "the normalization pass")):
        prep = _prepare(cfg, storage, spec)
    mean, scale = np.asarray(prep["mean"], np.float32), np.asarray(prep["scale"], np.float32)

    with watch(stall_s, "training", training_phase(cfg)):
        result = fit(cfg, storage, spec, mean, scale, prep["train_rows"])
    with watch(stall_s, "validation", data_phase(cfg, "the validation pass")):
        sketch = validation_errors(cfg, storage, spec, result.best_state, mean, scale)
    if sketch.rows == 0:
        raise InputError(f"data.input {spec.uri}: no validation rows; raise data.validation_fraction")
    feat_err = sketch.sq_sum / sketch.rows
    q = cfg.score.threshold_quantile
    threshold = float(sketch.quantile(q))
    hist = result.history
    best = next((h for h in hist if h["epoch"] == result.best_epoch), hist[-1])
    metrics = {
        "best_epoch": result.best_epoch, "epochs_run": len(hist), "best_val_loss": result.best_val_loss,
        "train_loss_at_best": best["train_loss"], "first_val_loss": hist[0]["val_loss"],
        "final_train_loss": hist[-1]["train_loss"], "batch_size": result.batch_size,
        "validation_score_quantiles": {str(p): float(sketch.quantile(p)) for p in (0.5, 0.9, 0.99, 0.999)},
        "epoch_limit": result.epochs,
        "still_improving": still_improving(hist, result.epochs, cfg.train.min_delta),
    }
    if metrics["still_improving"]:
        print(f"[train] warning: {metrics['still_improving']}", flush=True)
    model = build_model(spec.num_features, **dataclasses.asdict(cfg.model))
    model.load_state_dict(result.best_state)
    manifest = save_artifact(storage, run_uri, model, {
        "run_name": cfg.run.name,
        "config": requested.to_dict(),  # as asked; `model` below holds the sizes chosen for this input
        "n_features": spec.num_features,
        "feature_names": spec.feature_names,
        "latent_dim": cfg.model.latent_dim,
        "model": dataclasses.asdict(cfg.model),
        "auto_sizes": auto,
        "normalization": {"mean": prep["mean"], "scale": prep["scale"]},
        "threshold": threshold,
        "threshold_quantile": q,
        "data": {"input": spec.uri, "files": len(spec.files), "input_rows": spec.num_rows,
                 "train_rows": prep["train_rows"], "validation_rows": prep["validation_rows"],
                 "rejected_rows": prep["rejected_rows"], "rejects": prep.get("rejects")},
        "metrics": metrics,
        "history": hist,
        "per_feature_error": feat_err.tolist(),
        "validation_error_histogram": error_histogram_of(sketch),
    })
    report = join_uri(run_uri, "report.html")
    storage.write_bytes(report, training_report(manifest, sketch.sample, *validation_projection(
        cfg, storage, spec, manifest, model), val_rows=sketch.rows).encode())
    print(f"[train] report: {report}", flush=True)
    print(f"[train] model {manifest['model_version']} written to {model_dir(run_uri)} "
          f"(threshold {threshold:.5f} = q{q} of {sketch.rows} validation errors)", flush=True)
    return TrainSummary(run_uri=run_uri, model_version=manifest["model_version"], train_rows=prep["train_rows"],
                        validation_rows=prep["validation_rows"], rejected_rows=prep["rejected_rows"],
                        epochs_run=len(hist), best_epoch=result.best_epoch, first_val_loss=hist[0]["val_loss"],
                        best_val_loss=result.best_val_loss, final_train_loss=hist[-1]["train_loss"],
                        threshold=threshold, seconds=time.perf_counter() - start, manifest=manifest,
                        still_improving=metrics["still_improving"])


def score_job(cfg: Config, storage: Optional[Storage] = None, model_run: Optional[str] = None,
              as_of: Optional[dt.datetime] = None, run_date: Optional[dt.date] = None) -> Optional[ScoreResult]:
    """Score `data.input` into `output.uri/run_date=<run_date>/` with the model of run `model_run`.

    `model_run`: a run.name under artifacts.uri, "latest", or None for this config's run. With
    `score.incremental`, only input partitions this model version has not scored are read; returns None
    when there are none (nothing is published then).
    """
    storage = storage or Storage(cfg.storage)
    run_date = run_date or parse_run_date(None)
    for uri in (cfg.artifacts.uri, cfg.data.input, cfg.output.uri):
        storage.check_bucket(uri)  # a missing bucket must not read as "no trained model here"
    run_uri = resolve_model_run(storage, cfg.artifacts.uri, model_run) if model_run else cfg.run_uri
    manifest = read_manifest(storage, run_uri)
    n_features = len(manifest["feature_names"])
    if cfg.output.top_k_features > n_features:
        raise ConfigError(f"config output.top_k_features: {cfg.output.top_k_features} exceeds the model's "
                          f"{n_features} features")
    out = run_date_uri(cfg.output.uri, run_date)
    spec, plan = None, None
    if cfg.score.incremental:
        full = inspect_input(cfg.data, storage)
        plan = plan_incremental(storage, full.uri, full.files, cfg.output.uri, manifest["model_version"], run_date)
        if not plan.partitions:
            print(f"[score] nothing to score: all {len(plan.skipped)} input partitions already scored by "
                  f"{manifest['model_version']} (state: {plan.state_uri})", flush=True)
            return None
        print(f"[score] incremental: {len(plan.partitions)} partitions to score "
              f"({', '.join(list(plan.partitions)[:5])}{' ...' if len(plan.partitions) > 5 else ''}), "
              f"{len(plan.skipped)} already scored", flush=True)
        spec = inspect_input(cfg.data, storage, files=plan.files)
    res = score(cfg, storage, run_uri, out, as_of=as_of, spec=spec)
    if plan is not None:
        record_scored(storage, plan, run_date, spec.file_rows)
    print(f"[score] {res.scored_rows} rows scored ({res.rejected_rows} rejected, {res.anomalies} anomalies) "
          f"with {res.model_version} -> {res.output_uri} in {res.seconds:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in res.phases.items())})", flush=True)
    if "deciles" in manifest.get("validation_error_histogram", {}):
        counts = output_error_counts(storage, res.files, manifest["validation_error_histogram"])
        r_uri = report_uri(cfg.output.uri, run_date)
        storage.write_bytes(r_uri, scoring_report(manifest, run_date, counts, res.scored_rows, res.anomalies,
                                                  res.rejected_rows, res.output_uri).encode())
        print(f"[score] report: {r_uri}", flush=True)
    return res


def dry_run(cfg: Config, storage: Optional[Storage] = None, model_run: Optional[str] = None,
            train: bool = True, run_date: Optional[dt.date] = None) -> list[str]:
    """Check what a run would touch, without Ray and without writing anything but probe files.

    Config (already validated on load), write access to artifacts.uri and output.uri, every input footer,
    and with `model_run` (or `train=False`) the model and its feature list. Returns the lines it printed.
    """
    storage = storage or Storage(cfg.storage)
    run_date = run_date or parse_run_date(None)
    lines = [f"config ok: run {cfg.run.name}, model {cfg.model.kind}"]
    for uri in (cfg.run_uri, cfg.output.uri):
        storage.check_writable(uri)
        lines.append(f"storage ok: {uri} is writable")
    spec = inspect_input(cfg.data, storage)
    lines.append(f"input ok: {spec.uri}: {spec.num_rows} rows in {len(spec.files)} files, "
                 f"{spec.num_features} features")
    if model_run or not train:
        run_uri = resolve_model_run(storage, cfg.artifacts.uri, model_run) if model_run else cfg.run_uri
        manifest = read_manifest(storage, run_uri)
        check_features_match(manifest, spec)
        lines.append(f"model ok: {manifest['model_version']} ({run_uri}) matches the input's features")
        if cfg.score.incremental:
            plan = plan_incremental(storage, spec.uri, spec.files, cfg.output.uri, manifest["model_version"],
                                    run_date)
            lines.append(f"incremental: {len(plan.partitions)} partitions to score, {len(plan.skipped)} done")
    lines.append(f"output: {run_date_uri(cfg.output.uri, run_date)}")
    for line in lines:
        print(f"[dry-run] {line}", flush=True)
    return lines


