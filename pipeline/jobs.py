"""The three jobs, as library calls: train a model, score with it, or both. Entry points in `jobs/` are thin.

    train_job(cfg)  -> TrainSummary   check input, normalization pass, TorchTrainer (threshold included), artifact
    score_job(cfg)  -> ScoreResult    score with a stored model into `output.uri/run_date=…/`, publish atomically
    dry_run(cfg)    -> list[str]      check config, storage access, input schema (and the model) without Ray
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.artifacts import save_artifact
from pipeline.calibration import MAX_SUBSPACE_FEATURES, fitted_term_weights
from pipeline.manifest import model_dir, read_manifest
from pipeline.cluster import connect
from pipeline.code_space import align_codes, alignment_target
from pipeline.config import AUTO, Config
from pipeline.errors import ConfigError, InputError
from pipeline.featurizer import Featurizer
from pipeline.inputs import InputSpec, input_notes, inspect_input
from pipeline.models import build_model
from pipeline.metrics import flagged_share_note, output_error_counts
from pipeline.multinode import check_shared_storage
from pipeline.phases import Lap
from pipeline.prepare import prepare
from pipeline.preflight import check_train, for_model, table_model
from pipeline.report import scoring_report, term_weights_text, training_report
from pipeline.resources import check_job, data_phase, training_phase
from pipeline.schedule import (model_run_uri, parse_run_date, plan_incremental, record_scored, report_uri,
                               run_date_uri)
from pipeline.score import ScoreResult, score
from pipeline.sizing import (MAX_VALIDATION_FRACTION, VALIDATION_FRACTION, VALIDATION_ROWS, few_validation_rows,
                             still_improving)
from pipeline.sketch import ScoreSketch, error_histogram_of
from pipeline.storage import Storage
from pipeline.tracking import tracked_scoring, tracked_training
from pipeline.uri import join_uri
from pipeline.train import fit
from pipeline.validation import validation_projection
from pipeline.watchdog import watch


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
    code_space: str = ""
    """The model version whose coordinates the emitted `latent` uses (this model's own unless aligned)."""
    alignment_r2: Optional[float] = None
    """Held-out R^2 of the map onto the previous model's codes (None: no previous model to align to)."""
    still_improving: Optional[str] = None
    """Set when the run hit its epoch limit with the validation loss still falling (what to raise)."""
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per phase (checks, ray_start, prepare, training, artifact_and_report)."""


def _sized(cfg: Config, requested: Config, featurizer: Featurizer) -> tuple[Config, list[str]]:
    """The model sizes for the input's width once it is known (one-hot slots and missing indicators count),
    and which of them were `auto`."""
    cfg = dataclasses.replace(cfg, model=table_model(cfg, featurizer.width))
    auto = [k for k in ("hidden_dims", "latent_dim", "ensemble", "member_latent_dims")
            if getattr(requested.model, k) == AUTO]
    if auto:
        members = f" (member codes {cfg.model.member_latent_dims})" if cfg.model.ensemble > 1 else ""
        print(f"[train] model sizes for {featurizer.width} input slots ({len(featurizer.columns)} columns): "
              f"hidden_dims {cfg.model.hidden_dims}, latent_dim {cfg.model.latent_dim}, ensemble "
              f"{cfg.model.ensemble}{members} ({', '.join(auto)}: auto)", flush=True)
    if cfg.model.subspace_weight > 0 and featurizer.width > MAX_SUBSPACE_FEATURES:
        print(f"[train] model.subspace_weight {cfg.model.subspace_weight}: {featurizer.width} input slots, over "
              f"{MAX_SUBSPACE_FEATURES:,}: the score goes without the subspace term", flush=True)
    return cfg, auto


def _metrics(cfg: Config, result, sketch: ScoreSketch) -> dict[str, Any]:
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
    weights = fitted_term_weights(result.best_state)
    if weights is not None:  # the calibrated score's terms, weighted by their spread (pipeline/calibration.py)
        metrics["score_term_weights"] = weights
        print("[train] anomaly_score terms weighted by their spread over the validation rows: "
              + term_weights_text(weights), flush=True)
    if metrics["still_improving"]:
        print(f"[train] warning: {metrics['still_improving']}", flush=True)
    return metrics


def _save_model(cfg: Config, requested: Config, storage: Storage, spec: InputSpec, featurizer: Featurizer,
                prep: dict[str, Any], result, sketch: ScoreSketch, auto: list[str], codes: dict[str, Any]):
    """The best epoch's model and its manifest, written to the run's model directory: (manifest, model)."""
    q = cfg.train.threshold_quantile
    model = build_model(featurizer.width, layout=featurizer.layout(), **dataclasses.asdict(cfg.model))
    model.load_state_dict(result.best_state)
    manifest = save_artifact(storage, cfg.run_uri, model, {
        "run_name": cfg.run.name,
        "config": requested.to_dict(),  # as asked; `model` below holds the sizes chosen for this input
        "n_features": featurizer.width,
        "feature_names": featurizer.names,  # one per per-column error, in data.features order
        "features": featurizer.to_dict(),
        "latent_dim": cfg.model.latent_dim,
        "model": dataclasses.asdict(cfg.model),
        "auto_sizes": auto,
        "normalization": {"mean": prep["mean"], "scale": prep["scale"]},
        "threshold": float(sketch.quantile(q)),
        "threshold_quantile": q,
        "data": {"input": spec.uri, "files": len(spec.files), "input_rows": spec.num_rows,
                 "validation_fraction": cfg.data.validation_fraction,
                 "train_rows": prep["train_rows"], "validation_rows": prep["validation_rows"],
                 "rejected_rows": prep["rejected_rows"], "rejects": prep.get("rejects")},
        "metrics": _metrics(cfg, result, sketch),
        "history": result.history,
        "per_feature_error": (sketch.sq_sum / sketch.rows).tolist(),
        "validation_error_histogram": error_histogram_of(sketch),
        **codes,  # code_alignment, and code_space when aligned to a previous model (pipeline/code_space.py)
    })
    return manifest, model


def _split_as_prepared(cfg: Config, spec: InputSpec, prep: dict[str, Any]) -> tuple[Config, InputSpec]:
    """The config and input with the split's cut the prepare pass used: data.validation_fraction, or on a tiny
    input that it left one-sided, the cut it moved to (prepare.compute_stats), for every later pass."""
    cut = prep.get("validation_cut", cfg.data.validation_fraction)
    if cut == cfg.data.validation_fraction:
        return cfg, spec
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation_fraction=cut))
    return cfg, dataclasses.replace(spec, data=cfg.data)


@tracked_training
def train_job(cfg: Config, storage: Optional[Storage] = None, overwrite: bool = False,
              check_output: bool = False) -> TrainSummary:
    """`check_output`: also check that `output.uri` is writable before training (for train-then-score)."""
    start = time.perf_counter()
    phases: dict[str, float] = {}
    lap = Lap(phases)
    storage = storage or Storage(cfg.storage)
    spec = check_train(cfg, storage, overwrite, output=check_output)
    target = alignment_target(cfg, storage)  # before training: a model.align_to run that is not there ends here
    requested, cfg = cfg, dataclasses.replace(cfg, data=spec.data or cfg.data)
    if requested.data.validation_fraction == AUTO and cfg.data.validation_fraction > VALIDATION_FRACTION:
        print(f"[train] validation rows: {cfg.data.validation_fraction:.0%} of the {spec.num_rows:,} input rows "
              f"(data.validation_fraction auto: about {VALIDATION_ROWS} rows on a small input, from "
              f"{VALIDATION_FRACTION:.0%} up to {MAX_VALIDATION_FRACTION:.0%})", flush=True)
    for note in input_notes(requested.data, spec):
        print(f"[train] {note}", flush=True)
    lap("checks")
    connect(cfg.run.num_cpus)  # only once the cheap checks (config, storage, schema) have passed
    lap("ray_start")  # ~0 when the job has its Ray already (a cluster)
    cfg = check_job(cfg, "train")  # before any data is read: requests the cluster can never meet end here
    check_shared_storage(cfg, ("data.input", "artifacts.uri") + (("output.uri",) if check_output else ()))
    stall_s = cfg.run.stall_timeout_s
    with watch(stall_s, "prepare", data_phase(cfg, "the normalization pass")):
        prep = prepare(cfg, storage, spec)
    lap("prepare")
    cfg, spec = _split_as_prepared(cfg, spec, prep)
    featurizer = Featurizer.from_dict(prep["features"])
    cfg, auto = _sized(cfg, requested, featurizer)
    with watch(stall_s, "training", training_phase(cfg)):
        result = fit(cfg, storage, spec, featurizer, prep["train_rows"])
    lap("training")
    sketch = result.validation
    if sketch.rows == 0:
        raise InputError(f"data.input {spec.uri}: no validation rows; raise data.validation_fraction")
    few = few_validation_rows(sketch.rows, cfg.train.threshold_quantile)
    if few:
        print(f"[train] warning: {few}", flush=True)
    codes = align_codes(cfg, storage, spec, featurizer, result.best_state, target)
    manifest, model = _save_model(cfg, requested, storage, spec, featurizer, prep, result, sketch, auto, codes)
    report = join_uri(cfg.run_uri, "report.html")
    storage.write_bytes(report, training_report(manifest, sketch.sample, *validation_projection(
        cfg, storage, spec, featurizer, manifest, model), val_rows=sketch.rows).encode())
    lap("artifact_and_report")
    print(f"[train] report: {report}", flush=True)
    print(f"[train] model {manifest['model_version']} written to {model_dir(cfg.run_uri)} (threshold "
          f"{manifest['threshold']:.5f} = q{manifest['threshold_quantile']} of {sketch.rows} validation errors)",
          flush=True)
    hist = result.history
    steps, sketched = sum(h["step_seconds"] for h in hist), hist[-1].get("threshold_seconds", 0.0)
    print(f"[train] done in {time.perf_counter() - start:.1f}s ("
          + ", ".join(f"{k} {v:.1f}s" + (f" ({len(hist)} epochs, {steps:.1f}s in training steps, {sketched:.1f}s in "
                                          "the threshold pass)" if k == "training" else "")
                      for k, v in phases.items()) + ")", flush=True)
    return TrainSummary(run_uri=cfg.run_uri, model_version=manifest["model_version"], train_rows=prep["train_rows"],
                        validation_rows=prep["validation_rows"], rejected_rows=prep["rejected_rows"],
                        epochs_run=len(hist), best_epoch=result.best_epoch, first_val_loss=hist[0]["val_loss"],
                        best_val_loss=result.best_val_loss, final_train_loss=hist[-1]["train_loss"],
                        threshold=manifest["threshold"], seconds=time.perf_counter() - start, manifest=manifest,
                        still_improving=manifest["metrics"]["still_improving"], phases=phases,
                        code_space=manifest["code_space"], alignment_r2=manifest["code_alignment"]["r2"])


@tracked_scoring
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
    run_uri = model_run_uri(cfg, storage, model_run)
    manifest = read_manifest(storage, run_uri)
    cfg = for_model(cfg, manifest)
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
    quantile = float(manifest.get("threshold_quantile", cfg.train.threshold_quantile))
    res.flagged_note = flagged_share_note(res.anomalies, res.scored_rows, quantile)
    if res.flagged_note:
        print(f"[score] warning: {res.flagged_note}", flush=True)
    if "deciles" in manifest.get("validation_error_histogram", {}):
        counts = output_error_counts(storage, res.files, manifest["validation_error_histogram"])
        r_uri = report_uri(cfg.output.uri, run_date)
        storage.write_bytes(r_uri, scoring_report(manifest, run_date, counts, res.scored_rows, res.anomalies,
                                                  res.rejected_rows, res.output_uri).encode())
        print(f"[score] report: {r_uri}", flush=True)
    return res
