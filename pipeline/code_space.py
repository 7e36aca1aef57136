"""The training run's code space: whether its emitted `latent` takes a previous model's coordinates
(`model.align_to`), and the map that carries it there (pipeline/alignment.py).

    alignment_target(cfg, storage) -> run URI or None     before training: the previous model to align to
    align_codes(cfg, storage, spec, featurizer, state,    after training: the map, fitted on validation rows
                target) -> manifest section                (topped up with training rows on a small table)
                                                           encoded by both models, or why not (one line)

The manifest gets `code_alignment` ({aligned_to, map or None, r2, line}) and `code_space`: the previous
model's code space when aligned, else none (save_artifact then sets the model's own version). Only the emitted code is mapped: the
anomaly score, `recon_error` and `is_anomaly` use the model's own code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from pipeline.alignment import fit_alignment
from pipeline.artifacts import load_artifact
from pipeline.config import Config
from pipeline.errors import ArtifactError, ConfigError
from pipeline.featurizer import Featurizer
from pipeline.inputs import InputSpec
from pipeline.manifest import code_space_of
from pipeline.predictor import Predictor
from pipeline.registry import input_layout
from pipeline.schedule import LATEST, resolve_model_run
from pipeline.storage import Storage
from pipeline.validation import validation_slots

NONE = "none"
FIT_ROWS = 1000  # fewer validation rows than this: training rows fill up the fit (a 16-wide affine map has 272
                 # parameters; a small table's few dozen validation rows cannot judge it)


def alignment_target(cfg: Config, storage: Storage) -> Optional[str]:
    """The run whose coordinates this run's codes should take: `latest` finished run under artifacts.uri
    (None when there is none), a named run (an error when it has no model), or None for `none`."""
    to = cfg.model.align_to
    if to == NONE:
        return None
    try:
        run_uri = resolve_model_run(storage, cfg.artifacts.uri, to)
    except ArtifactError:
        if to == LATEST:
            return None  # the first model under artifacts.uri starts the code space
        raise ConfigError(f"config model.align_to: no finished run {to!r} under {cfg.artifacts.uri} "
                          "(`latest`, `none` or a run name)") from None
    return None if run_uri.rstrip("/") == cfg.run_uri.rstrip("/") else run_uri


def _fit_rows(cfg: Config, storage: Storage, spec: InputSpec, featurizers: list[Featurizer]) -> list[Any]:
    """The rows the map is fitted on, as each model's input: the run's validation rows, then training rows up to
    FIT_ROWS when there are fewer (the map sees no labels; both models encode any row alike)."""
    val = validation_slots(cfg, storage, spec, featurizers)
    if len(val[0]) >= FIT_ROWS:
        return val
    more = validation_slots(cfg, storage, spec, featurizers, max_rows=FIT_ROWS - len(val[0]), validation=False)
    return [np.concatenate([a, b]) for a, b in zip(val, more)]


def _own(line: str, target: Optional[str] = None, r2: Optional[float] = None) -> dict[str, Any]:
    print(f"[train] code space: {line}", flush=True)
    return {"code_alignment": {"aligned_to": target, "map": None, "r2": r2, "line": line}}


def align_codes(cfg: Config, storage: Storage, spec: InputSpec, featurizer: Featurizer, state: dict[str, Any],
                target: Optional[str]) -> dict[str, Any]:
    """The manifest's `code_alignment` (and `code_space` when aligned) for the model `state`."""
    if target is None:
        why = "model.align_to: none" if cfg.model.align_to == NONE else f"no finished run under {cfg.artifacts.uri}"
        return _own(f"new code space ({why})")
    try:
        old = load_artifact(storage, target)
        same_layout = input_layout(old.manifest) == input_layout({"features": featurizer.to_dict()})
    except (ArtifactError, KeyError, TypeError, ValueError) as e:  # a broken or foreign model: never this run's end
        return _own(f"new code space: the model at {target} does not load ({str(e) or e.__class__.__name__})", target)
    if not same_layout:
        return _own(f"new code space: {old.version} reads another input layout (columns, order or roles)", target)
    if int(old.manifest["latent_dim"]) != int(cfg.model.latent_dim):
        return _own(f"new code space: {old.version}'s code is {old.manifest['latent_dim']} wide, this model's "
                    f"{cfg.model.latent_dim}", target)
    x_new, x_old = _fit_rows(cfg, storage, spec, [featurizer, old.featurizer])
    new = Predictor.from_state(dataclasses.asdict(cfg.model), state, featurizer)(x_new).latent
    previous = Predictor(old.model, old.featurizer, manifest=old.manifest)(x_old).latent  # its emitted coordinates
    space = code_space_of(old.manifest)
    try:
        fitted = fit_alignment(new, previous, space)
    except ValueError as e:
        return _own(f"new code space: no alignment to {old.version} ({e})", target)
    if fitted.r2 < cfg.model.align_min_r2:
        return _own(f"new code space: mapped onto {old.version}'s codes, R^2 {fitted.r2:.3f} on held-out "
                    f"rows is below model.align_min_r2 {cfg.model.align_min_r2:g}", target, fitted.r2)
    line = (f"aligned to {old.version} (code space {space}): {fitted.kind} map, R^2 {fitted.r2:.3f} on held-out "
            f"rows ({fitted.rows} rows: validation first, training rows when there are fewer than {FIT_ROWS})")
    print(f"[train] code space: {line}", flush=True)
    return {"code_space": space, "code_alignment": {"aligned_to": target, "map": fitted.to_dict(),
                                                    "r2": fitted.r2, "line": line}}
