"""The MLflow Model Registry side of a model: registering a training run's model, finding the model a
`models:/` reference names, and moving an alias (promotion) after checking the candidate.

A registered version carries a copy of the model directory (weights.safetensors + manifest.json) inside an
MLflow pyfunc model (pipeline/pyfunc_model.py, logged as code: no pickle), and tags that point back to the
model's own artifact, where batch scoring reads it:

    artifact_uri     the training run's `artifacts.uri/<run.name>` (its model/ is what batch scoring loads)
    model_version    the manifest's `<run.name>@<weights sha256 prefix>`, the `model_version` output column
    weights_sha256   checked against the artifact when scoring: a run retrained under the same name since it
                     was registered is refused, never scored as if it were that version
    input_layout     the input's columns with their roles (sha256 of them): promotion needs the same layout
    validation_loss  the best epoch's validation loss: promotion needs it no worse than the current holder's

MLflow is imported inside the functions: the pipeline runs without it when nothing is tracked.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.manifest import MANIFEST, WEIGHTS, featurizer_of, model_dir, read_manifest
from pipeline.errors import ArtifactError, ConfigError, PipelineError
from pipeline.storage import Storage
from pipeline.tracking_section import ModelRef, parse_models_uri, redact_uri
from pipeline.uri import join_uri, normalize_uri

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PYFUNC_ARTIFACT = "model_run"  # the pyfunc's artifact key: a copy of `<run>/` holding model/
MODEL_PATH = "model"           # where the pyfunc model lies in its MLflow run's artifacts
DEFAULT_TOLERANCE = 0.05


class PromotionRefused(PipelineError):
    """The candidate does not pass the checks against the alias's current holder."""


def input_layout(manifest: dict[str, Any]) -> list[list[str]]:
    """The input as the model reads it: each feature column's name, role and type family, in order."""
    fz = featurizer_of(manifest)
    cols = [[c.name, "categorical" if hasattr(c, "levels") else "numeric", c.family] for c in fz.columns]
    return [["vector", fz.vector]] + cols if fz.vector else cols


def layout_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(input_layout(manifest)).encode()).hexdigest()[:16]


def version_tags(manifest: dict[str, Any], run_uri: str) -> dict[str, str]:
    return {
        "artifact_uri": normalize_uri(run_uri),
        "model_version": manifest["model_version"],
        "weights_sha256": manifest["weights"]["sha256"],
        "input_layout": layout_digest(manifest),
        "validation_loss": repr(float(manifest["metrics"]["best_val_loss"])),
        "threshold": repr(float(manifest["threshold"])),
    }


def pip_requirements() -> list[str]:
    """What the pyfunc model needs beside the pipeline package itself (which must be importable where the
    model is loaded or served: it holds the scoring code)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "numpy", "pandas", "pyarrow", "safetensors", "pyyaml")]


def save_pyfunc(storage: Storage, run_uri: str, dest: Path) -> Path:
    """An MLflow pyfunc model directory at `dest/model` carrying a copy of the run's model/ (weights and
    manifest, nothing else). Returns it."""
    import mlflow.pyfunc

    copy = dest / "copy"
    (copy / "model").mkdir(parents=True)
    for name in (WEIGHTS, MANIFEST):
        (copy / "model" / name).write_bytes(storage.read_bytes(join_uri(model_dir(run_uri), name)))
    path = dest / MODEL_PATH
    # No signature on purpose: the input is whatever columns the model's featurizer reads (its manifest), and
    # MLflow would say at every save that a DataFrame type hint gives none.
    log = logging.getLogger("mlflow.pyfunc")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        mlflow.pyfunc.save_model(str(path), python_model=str(PYFUNC_CODE), artifacts={PYFUNC_ARTIFACT: str(copy)},
                                 pip_requirements=pip_requirements())
    finally:
        log.setLevel(level)
    return path


def register(client: Any, run_id: str, name: str, storage: Storage, run_uri: str,
             manifest: dict[str, Any]) -> str:
    """Log the pyfunc model to the run and register it as a new version of `name`. Returns the version."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="pyfunc-") as tmp:
        client.log_artifacts(run_id, str(save_pyfunc(storage, run_uri, Path(tmp))), MODEL_PATH)
    try:
        client.create_registered_model(name, description="Tabular autoencoder (tabular-autoencoders pipeline)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(name, f"runs:/{run_id}/{MODEL_PATH}", run_id=run_id,
                                     tags=version_tags(manifest, run_uri),
                                     description=f"{manifest['model_version']} ({normalize_uri(run_uri)})")
    return str(mv.version)


def client_for(uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise PipelineError(f"MLflow at {redact_uri(uri)}: the mlflow package is not installed; "
                            "pip install -e '.[tracking]' (or unset tracking.uri and MLFLOW_TRACKING_URI)") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_version(client: Any, ref: ModelRef) -> Any:
    """The ModelVersion `ref` names now (an alias is read once: the caller pins the number it gets)."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias is not None:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, str(ref.version))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            what = f"no alias {ref.alias!r}" if ref.alias is not None else f"no version {ref.version}"
            raise ArtifactError(f"--model {ref.uri}: {what} on registered model {ref.name!r}") from None
        raise


def holder(client: Any, name: str, alias: str) -> Optional[Any]:
    """The version `alias` points to, or None when it points nowhere yet."""
    try:
        return get_version(client, ModelRef(name, alias=alias))
    except ArtifactError:
        return None


def registered_version_of(client: Any, name: str, model_version: str) -> Optional[Any]:
    """The version of `name` registered from the model `model_version` (`<run.name>@<sha prefix>`), if any."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if (mv.tags or {}).get("model_version") == model_version:
            return mv
    return None


def artifact_of(storage: Storage, mv: Any) -> str:
    """The model artifact (run URI) a registered version was made from, checked to be that same model."""
    tags = dict(mv.tags or {})
    where = f"models:/{mv.name}/{mv.version}"
    if "artifact_uri" not in tags or "weights_sha256" not in tags:
        raise ArtifactError(f"{where}: not registered by this pipeline (no artifact_uri/weights_sha256 tags)")
    run_uri = tags["artifact_uri"]
    manifest = read_manifest(storage, run_uri)
    if manifest["weights"]["sha256"] != tags["weights_sha256"]:
        raise ArtifactError(f"{where}: the artifact at {run_uri} was replaced since it was registered (now "
                            f"{manifest['model_version']}, registered {tags.get('model_version')}); score a "
                            "newer version or retrain under another run.name")
    return run_uri


def lookup(tracking_uri: Optional[str], ref: ModelRef, client: Any = None) -> Any:
    """The ModelVersion `ref` names, asked of the registry at `tracking_uri`; any failure in one line."""
    if tracking_uri is None:
        raise ConfigError(f"--model {ref.uri}: a registry needs tracking.uri or MLFLOW_TRACKING_URI")
    try:
        return get_version(client or client_for(tracking_uri), ref)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - the server's failure, said in one line
        raise PipelineError(f"--model {ref.uri}: MLflow at {redact_uri(tracking_uri)} did not answer "
                            f"({e.__class__.__name__})") from None


def registered_run_uri(tracking_uri: Optional[str], storage: Storage, text: str) -> str:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> the run URI whose model/ batch scoring loads."""
    return artifact_of(storage, lookup(tracking_uri, parse_models_uri(text)))


# ------------------------------------------------------------------------------------------ promotion


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    previous: Optional[str]
    forced: bool
    by: str
    at: str

    def line(self) -> str:
        was = f"from version {self.previous}" if self.previous else "first holder"
        return (f"models:/{self.name}@{self.alias} -> version {self.version} ({was}; by {self.by} at {self.at}"
                + (", forced" if self.forced else "") + ")")


def check_candidate(candidate: Any, current: Any, tolerance: float) -> Optional[str]:
    """Why `candidate` may not take over from `current` (None: it may)."""
    c, h = dict(candidate.tags or {}), dict(current.tags or {})
    for key in ("input_layout", "validation_loss"):
        if key not in c:
            return f"version {candidate.version} has no {key} tag (not registered by this pipeline)"
    if "input_layout" in h and c["input_layout"] != h["input_layout"]:
        return (f"version {candidate.version} reads a different input layout than version {current.version} "
                "(columns, order or roles differ)")
    if "validation_loss" in h:
        new, old = float(c["validation_loss"]), float(h["validation_loss"])
        if new > old * (1.0 + tolerance):
            return (f"version {candidate.version}'s validation loss {new:.5g} is worse than version "
                    f"{current.version}'s {old:.5g} by more than {tolerance:.0%}")
    return None


def who() -> str:
    """The promoting user: MLFLOW_TRACKING_USERNAME when set (the identity the server sees), else the login."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


def promote(client: Any, name: str, version: str, alias: str, tolerance: float = DEFAULT_TOLERANCE,
            force: bool = False) -> Promotion:
    """Point `alias` at `version` if it passes the checks against the current holder (or `force`), and
    record the move as tags: on the version (`promoted.<alias>`) and on the model (`alias.<alias>.last_move`)."""
    candidate = get_version(client, ModelRef(name, version=int(version)))
    current = holder(client, name, alias)
    if current is not None and str(current.version) == str(candidate.version):
        raise PromotionRefused(f"models:/{name}@{alias} already points to version {version}")
    if current is not None and not force:
        why = check_candidate(candidate, current, tolerance)
        if why:
            raise PromotionRefused(f"not promoting {name} version {version} to {alias}: {why} "
                                   "(--force to promote anyway)")
    move = Promotion(name, str(candidate.version), alias, str(current.version) if current else None, force, who(),
                     dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    client.set_registered_model_alias(name, alias, move.version)
    record = json.dumps({"version": move.version, "previous": move.previous, "by": move.by, "at": move.at,
                         "forced": move.forced})
    client.set_model_version_tag(name, move.version, f"promoted.{alias}", record)
    client.set_registered_model_tag(name, f"alias.{alias}.last_move", record)
    return move
