"""MLflow tracking of the jobs: one MLflow run per training or scoring run, logged from the driver only.

    @tracked_training   on train_job: starts the run before any check or training (an unreachable server set
                        in tracking.uri ends the job there, exit 2), then logs the resolved config as params,
                        the epoch history (train/validation loss, rows/s; step = epoch), the final figures,
                        the report and manifest, tags, and with tracking.registered_model a new model version
    @tracked_scoring    on score_job: pins a `models:/NAME@ALIAS` reference to the version it names at start,
                        scores with it, and logs rows in/out/rejected, anomaly rate, PSI against training,
                        AUROC when the input has planted truth, and the output URI, tagged with the version

Neither does anything when no tracking URI is set (tracking.uri, else MLFLOW_TRACKING_URI). A server that stops
answering mid-run never fails the job: the first failed call turns tracking off for the rest of the run and
the job ends with one warning naming what was not logged. Credentials stay in MLflow's own environment
variables (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN); nothing here logs the environment, and URIs are shown
without user info.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from pipeline.manifest import MANIFEST, model_dir, read_manifest
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.registry import client_for, lookup, register, registered_version_of
from pipeline.storage import Storage
from pipeline.tracking_section import ModelRef, is_models_uri, parse_models_uri, redact_uri
from pipeline.uri import join_uri

# MLflow retries a failed request 7 times with exponential backoff (minutes) by default; a job that has lost
# its server should not wait that long at each call. A value set in the environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
EPOCH_METRICS = ("train_loss", "val_loss", "rows_per_s", "epoch_seconds")
PARAM_LIMIT = 6000     # MLflow's longest param value
BATCH = 100            # params per log_batch call (MLflow's limit)
METRIC_BATCH = 1000    # metrics per log_batch call (MLflow's limit)


def _why(e: BaseException) -> str:
    """A failure in a few words: the class and MLflow's error code, never the message (it may quote a URL)."""
    code = getattr(e, "error_code", None)
    return f"{e.__class__.__name__}{f' {code}' if code else ''}"


class Tracker:
    """One MLflow run. Every call goes through `call`: the first failure stops tracking, later calls are only
    counted as not logged."""

    def __init__(self, client: Any, uri: str, run_id: str, experiment: str):
        self.client, self.uri, self.run_id, self.experiment = client, uri, run_id, experiment
        self.failed: Optional[str] = None
        self.missed: list[str] = []

    def call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            self.missed.append(what)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never fail the job it tracks
            self.failed = f"{what}: {_why(e)}"
            self.missed.append(what)
            return None

    def guard(self, what: str, fn: Callable, *args: Any) -> Any:
        """`fn(*args)`, which logs through `call`; an error of its own (reading the artifact back, say) is
        reported like a failed call: a finished job never fails for its tracking."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001
            self.failed = self.failed or f"{what}: {_why(e)}"
            self.missed.append(what)
            return None

    def end(self, status: str, job: str, kept: str) -> None:
        self.call("run status", self.client.set_terminated, self.run_id, status)
        if self.missed:
            print(f"[tracking] warning: MLflow at {redact_uri(self.uri)} failed ({self.failed}); not logged to run "
                  f"{self.run_id}: {', '.join(dict.fromkeys(self.missed))}. The {job} is not affected: {kept}",
                  flush=True)


def start(cfg: Config, job: str, run_name: str, tags: dict[str, str]) -> Optional[Tracker]:
    """The MLflow run of this job, or None when nothing is tracked. A server that cannot be reached (or refuses
    the credentials) is a one-line error when tracking.uri names it, a warning when MLFLOW_TRACKING_URI does."""
    uri, explicit = cfg.tracking.resolved_uri()
    if uri is None:
        return None
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    experiment = cfg.tracking.experiment or cfg.run.name
    client = client_for(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=run_name, tags={"job": job, **tags})
    except Exception as e:  # noqa: BLE001 - any failure here means no tracking server to log to
        where = f"MLflow at {redact_uri(uri)} cannot be reached or refused the request ({_why(e)})"
        if explicit:
            raise PipelineError(f"config tracking.uri: {where}; start it, or unset tracking.uri to run untracked") \
                from None
        print(f"[tracking] warning: {where}; MLFLOW_TRACKING_URI is set but this run is not tracked", flush=True)
        return None
    print(f"[tracking] {job} run {run.info.run_id} in experiment {experiment!r} at {redact_uri(uri)}", flush=True)
    return Tracker(client, uri, run.info.run_id, experiment)


# ------------------------------------------------------------------------------------------ training


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.003", ...}; long values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            text = "null" if v is None else str(v)
            out[key] = text if len(text) <= PARAM_LIMIT else text[:PARAM_LIMIT - 3] + "..."
    return out


def resolved_params(manifest: dict[str, Any]) -> dict[str, str]:
    """The config the run asked for with what `auto` became: model sizes, epoch limit, batch size, features."""
    cfg = dict(manifest["config"])
    cfg["model"] = {**cfg["model"], **manifest["model"]}
    m = manifest["metrics"]
    cfg["train"] = {**cfg["train"], "epochs": m["epoch_limit"], "batch_size": m["batch_size"]}
    cfg["data"] = {**cfg["data"], "features": manifest["feature_names"]}
    cfg.pop("tracking", None)  # the tracking server's own address is no parameter of the model
    return flatten(cfg)


def final_metrics(summary: Any) -> dict[str, float]:
    man = summary.manifest
    m = man["metrics"]
    out = {"best_epoch": summary.best_epoch, "epochs_run": summary.epochs_run, "best_val_loss": summary.best_val_loss,
           "first_val_loss": summary.first_val_loss, "final_train_loss": summary.final_train_loss,
           "threshold": summary.threshold, "train_rows": summary.train_rows,
           "validation_rows": summary.validation_rows, "rejected_rows": summary.rejected_rows,
           "seconds": summary.seconds}
    out.update({f"validation_score_q{q}": v for q, v in m["validation_score_quantiles"].items()})
    out.update({f"phase_{k}_s": v for k, v in summary.phases.items()})
    out.update({f"score_weight_{k}": v for k, v in (m.get("score_term_weights") or {}).items()})
    if getattr(summary, "alignment_r2", None) is not None:  # the map onto the previous model's codes
        out["code_space_r2"] = float(summary.alignment_r2)
    for key in ("code_alignment", "alignment_r2", "auroc"):  # figures a model kind or input may add
        if isinstance(m.get(key), (int, float)):
            out[key] = m[key]
    return {k: float(v) for k, v in out.items()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _log_batch(tracker: Tracker, what: str, metrics: list = (), params: list = (), tags: list = ()) -> None:
    for i in range(0, max(len(params), 1), BATCH):
        if params:
            tracker.call(what, tracker.client.log_batch, tracker.run_id, params=params[i:i + BATCH])
    for i in range(0, len(metrics), METRIC_BATCH):
        tracker.call(what, tracker.client.log_batch, tracker.run_id, metrics=metrics[i:i + METRIC_BATCH])
    if tags:
        tracker.call(what, tracker.client.log_batch, tracker.run_id, tags=tags)


def log_training(tracker: Tracker, cfg: Config, storage: Storage, summary: Any) -> Optional[str]:
    """Everything a finished training run logs; returns the registered version, if one was made."""
    from mlflow.entities import Metric, Param, RunTag

    man = summary.manifest
    now = int(time.time() * 1000)
    _log_batch(tracker, "params", params=[Param(k, v) for k, v in resolved_params(man).items()])
    epochs = [Metric(k, float(h[k]), now, int(h["epoch"])) for h in man["history"] for k in EPOCH_METRICS if k in h]
    _log_batch(tracker, "epoch metrics", metrics=epochs)
    _log_batch(tracker, "final metrics", metrics=[Metric(k, v, now, 0) for k, v in final_metrics(summary).items()])
    d = man["data"]
    tags = {"model_version": man["model_version"], "input_uri": d["input"], "input_rows": d["input_rows"],
            "train_rows": d["train_rows"], "validation_rows": d["validation_rows"],
            "rejected_rows": d["rejected_rows"], "artifact_uri": summary.run_uri, "code_space": summary.code_space}
    commit = git_commit()
    tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    if summary.still_improving:
        tags["still_improving"] = summary.still_improving
    _log_batch(tracker, "tags", tags=[RunTag(k, str(v)) for k, v in tags.items()])
    with tempfile.TemporaryDirectory(prefix="tracking-") as tmp:
        for name, uri in (("report.html", join_uri(summary.run_uri, "report.html")),
                          (MANIFEST, join_uri(model_dir(summary.run_uri), MANIFEST))):
            if tracker.failed is not None:
                tracker.missed.append(name)
                continue
            path = Path(tmp) / name
            path.write_bytes(storage.read_bytes(uri))
            tracker.call(name, tracker.client.log_artifact, tracker.run_id, str(path))
    name = cfg.tracking.registered_model
    if not name:
        return None
    version = tracker.call("model version", register, tracker.client, tracker.run_id, name, storage,
                           summary.run_uri, man)
    if version is not None:
        print(f"[tracking] registered models:/{name}/{version} ({man['model_version']})", flush=True)
    return version


def tracked_training(train_job: Callable) -> Callable:
    """Wrap `train_job(cfg, storage=None, ...)` in an MLflow run (see the module docstring)."""

    @functools.wraps(train_job)
    def run(cfg: Config, *args: Any, **kwargs: Any) -> Any:
        tracker = start(cfg, "train", cfg.run.name, {"run_name": cfg.run.name, "input_uri": cfg.data.input})
        if tracker is None:
            return train_job(cfg, *args, **kwargs)
        try:
            summary = train_job(cfg, *args, **kwargs)
        except BaseException as e:
            tracker.call("run status", tracker.client.set_terminated, tracker.run_id,
                         "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        tracker.guard("the training record", log_training, tracker, cfg, Storage(cfg.storage), summary)
        tracker.end("FINISHED", "training", f"the model is at {model_dir(summary.run_uri)}")
        return summary

    return run


# ------------------------------------------------------------------------------------------ scoring


def scoring_metrics(cfg: Config, storage: Storage, res: Any) -> dict[str, float]:
    """Rows in/out/rejected, anomaly rate, PSI of the output's errors over the training deciles, and AUROC
    against planted truth when the input has it."""
    from pipeline.metrics import evaluate_against_truth, output_error_counts
    from pipeline.report import population_stability_index

    out = {"input_rows": res.input_rows, "scored_rows": res.scored_rows, "rejected_rows": res.rejected_rows,
           "anomalies": res.anomalies, "anomaly_rate": res.anomalies / max(res.scored_rows, 1),
           "seconds": res.seconds}
    success = storage.read_json(join_uri(res.output_uri, "_SUCCESS"))
    hist = read_manifest(storage, success["model_uri"]).get("validation_error_histogram", {})
    if "deciles" in hist and res.files:
        counts = output_error_counts(storage, res.files, hist)
        out["psi"] = population_stability_index(np.ones(10), counts["deciles"])
    ev = evaluate_against_truth(cfg, storage, res.output_uri)
    if ev:
        out.update({f"truth_{k}": ev[k] for k in ("auroc", "precision", "recall") if k in ev})
    return {k: float(v) for k, v in out.items()}


def tracked_scoring(score_job: Callable) -> Callable:
    """Wrap `score_job(cfg, storage=None, model_run=None, ...)`: pin a `models:/` alias, track the run."""
    sig = inspect.signature(score_job)

    @functools.wraps(score_job)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        cfg: Config = bound.arguments["cfg"]
        model_run = bound.arguments.get("model_run")
        ref = parse_models_uri(model_run) if is_models_uri(model_run) else None
        run_date = bound.arguments.get("run_date")
        tags = {"model_reference": model_run or cfg.run.name, "input_uri": cfg.data.input,
                "output_uri": cfg.output.uri}
        mv = None
        if ref is not None:
            # an alias is read once, before the run starts: the whole run scores this version
            mv = lookup(cfg.tracking.resolved_uri()[0], ref)
            if ref.alias is not None:
                print(f"[score] {model_run} is version {mv.version} ({(mv.tags or {}).get('model_version')})",
                      flush=True)
            bound.arguments["model_run"] = ModelRef(ref.name, version=int(mv.version)).uri
            tags.update({"registered_model_version": f"{mv.name}/{mv.version}", "model_run_id": mv.run_id or ""})
        tracker = start(cfg, "score", f"score-{cfg.run.name}" + (f"-{run_date}" if run_date else ""), tags)
        if tracker is None:
            return score_job(*bound.args, **bound.kwargs)
        try:
            res = score_job(*bound.args, **bound.kwargs)
        except BaseException as e:
            tracker.call("run status", tracker.client.set_terminated, tracker.run_id,
                         "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if res is None:  # incremental: nothing left to score
            tracker.call("tags", tracker.client.set_tag, tracker.run_id, "nothing_to_score", "true")
            tracker.end("FINISHED", "scoring", "nothing was left to score")
            return res
        tracker.guard("the scoring record", log_scoring, tracker, cfg, bound.arguments.get("storage"), res,
                      mv is None)
        tracker.end("FINISHED", "scoring", f"the output is published at {res.output_uri}")
        return res

    return run


def log_scoring(tracker: Tracker, cfg: Config, storage: Optional[Storage], res: Any, find_version: bool) -> None:
    """A finished scoring run's figures and tags; with `find_version`, the registered version of its model
    (one this config trained and registered) is looked up to link the run to it."""
    from mlflow.entities import Metric, RunTag

    storage = storage or Storage(cfg.storage)
    now = int(time.time() * 1000)
    metrics = scoring_metrics(cfg, storage, res)
    _log_batch(tracker, "metrics", metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    tags = {"model_version": res.model_version, "output_uri": res.output_uri}
    if find_version and cfg.tracking.registered_model:
        mv = tracker.call("tags", registered_version_of, tracker.client, cfg.tracking.registered_model,
                          res.model_version)
        if mv is not None:
            tags.update({"registered_model_version": f"{mv.name}/{mv.version}", "model_run_id": mv.run_id or ""})
    _log_batch(tracker, "tags", tags=[RunTag(k, v) for k, v in tags.items()])
