"""What a job checks before it starts Ray: config against input, storage access, the model against the input.

Each check fails in seconds with one line a user can act on, before any Ray worker starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.manifest import MANIFEST, featurizer_of, model_dir
from pipeline.config import Config
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.inputs import InputSpec, inspect_input
from pipeline.roles import CATEGORICAL
from pipeline.sizing import resolve_model
from pipeline.storage import Storage
from pipeline.uri import join_uri, normalize_uri


def table_model(cfg: Config, width: int):
    """The model section with `auto` sizes chosen for an input `width` slots wide (pipeline/sizing.py);
    explicit ones checked."""
    return resolve_model(cfg.model, width, cfg.train.algorithm)


def check_categoricals(cfg: Config, spec: InputSpec) -> None:
    """A model kind or learning rule without a softmax head refuses categorical columns, before any work."""
    cats = [r.name for r in spec.roles if r.role == CATEGORICAL]
    if not cats:
        return
    if cfg.train.algorithm == "recirculation":
        raise ConfigError(f"config train.algorithm: recirculation takes numeric columns only; {cats[:3]} are "
                          "categorical (use backprop, or leave them out of data.features)")
    if not cfg.model.spec.categorical:
        raise ConfigError(f"config model.kind: {cfg.model.kind} takes numeric columns only; {cats[:3]} are "
                          "categorical (use another kind, or leave them out of data.features)")


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
    check_categoricals(cfg, spec)
    if not any(r.role == CATEGORICAL for r in spec.roles):  # else checked once the prepare pass knows the levels
        table_model(cfg, spec.num_features)  # checks explicit sizes against the input's width
    if finished:  # only once the new run's input has passed its checks
        print(f"[train] --overwrite: deleting the previous run at {run_uri}", flush=True)
        storage.delete_dir(run_uri)
    return spec


def for_model(cfg: Config, manifest: dict[str, Any]) -> Config:
    """`data.features: auto` when scoring means the model's columns (new columns in the input are ignored)."""
    if cfg.data.features != "auto":
        return cfg
    fz = featurizer_of(manifest)
    features = fz.vector if fz.vector else fz.names
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features))


def check_features_match(manifest: dict[str, Any], spec: InputSpec) -> None:
    """The input's features are the model's: the same columns in the same order, and for scalar columns the
    same kind of type (a column that was an integer in training and is a string now: one line naming it)."""
    fz = featurizer_of(manifest)
    want, got = fz.names, spec.feature_names
    if want == got:
        if spec.schema is not None:
            fz.check_types(spec.schema, f"data.input {spec.uri}")
        return
    if len(want) != len(got):
        raise InputError(f"data.input {spec.uri}: {len(got)} features, but the model was trained on {len(want)}")
    if sorted(want) == sorted(got):
        raise InputError(f"data.input {spec.uri}: feature order differs from the model's manifest")
    missing = [f for f in want if f not in got]
    raise InputError(f"data.input {spec.uri}: features differ from the model's manifest (missing {missing[:5]})")


def check_score(cfg: Config, storage: Storage, model_run_uri: str, output_uri: str) -> InputSpec:
    """Everything scoring can check before starting Ray: the model artifact (checksum included), the
    input's schema against the model's features, and that the output location is writable."""
    for uri in (model_run_uri, cfg.data.input, output_uri):
        storage.check_bucket(uri)
    from pipeline.artifacts import load_artifact  # torch: loaded only where the weights are checked

    manifest = load_artifact(storage, model_run_uri).manifest
    spec = inspect_input(cfg.data, storage)
    check_features_match(manifest, spec)
    storage.check_writable(normalize_uri(output_uri))
    return spec
