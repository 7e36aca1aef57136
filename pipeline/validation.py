"""The training run's validation pass: the best model scored on the held-out rows.

    validation_errors(cfg, storage, spec, state, featurizer)   a bounded-memory sketch of the per-row scores
                                                               (for the anomaly threshold) and per-column
                                                               error, on Ray Data
    validation_projection(cfg, storage, spec, featurizer,      a sample of validation rows read on the driver,
                          manifest, model)
                                                               their codes, flags and planted truth (for the
                                                               training report's charts)
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import Config
from pipeline.data import InputSpec, SplitFeatures, batch_rows, read_dataset, validation_mask
from pipeline.features import Featurizer
from pipeline.models import build_model
from pipeline.metrics import TRUTH_COLUMN
from pipeline.sketch import ScoreSketch, ValidationSketch
from pipeline.storage import Storage
from pipeline.tensors import Normalizer, arrow_to_tensor
from pipeline.watchdog import beating

PROJECTION_ROWS = 4000  # enough points to see structure in a scatter, few enough to read on the driver


class ErrorScorer:
    """The validation pass's map function: per-row score and per-column error of `x` rows.

    Made on the driver and run in Ray Data tasks (like scoring's `ScoreBatches`), not an actor pool: Ray Data
    restarts pool actors from constructor arguments kept in the object store, and Ray's core worker logs an
    error-level line about that for every pool, which reads like a failure."""

    def __init__(self, model_settings: dict[str, Any], n_features: int, state: dict[str, torch.Tensor],
                 mean: np.ndarray, scale: np.ndarray, torch_threads: int = 1, layout=None):
        self.torch_threads = max(1, torch_threads)
        self.model = build_model(n_features, layout=layout, **model_settings)
        self.model.load_state_dict(state)
        self.model.eval()
        self.normalizer = Normalizer(mean, scale)

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:

        torch.set_num_threads(self.torch_threads)
        x = self.normalizer(arrow_to_tensor(table))
        score, _, sq = self.model.score_and_latent(x)
        return {"score": score.numpy().astype(np.float32), "sq_error": sq.numpy().astype(np.float32)}


def validation_errors(cfg: Config, storage: Storage, spec: InputSpec, state, featurizer: Featurizer) -> ScoreSketch:
    """Sketch of the best model's per-row validation scores and per-column error (distributed).

    Each block is scored and summarized in one task (pipeline/sketch.py); the driver merges fixed-size
    summaries, so its memory does not grow with the validation rows."""
    fn = ValidationSketch(dict(model_settings=dataclasses.asdict(cfg.model), n_features=featurizer.width,
                               state=state, mean=featurizer.offset, scale=featurizer.scale,
                               layout=featurizer.layout()), cfg.score.batch_size, uuid.uuid4().hex)
    cpus = {"num_cpus": cfg.score.cpus_per_actor}
    fz = None if featurizer.vector else featurizer
    summaries = read_dataset(spec, storage, **cpus).map_batches(
        SplitFeatures(cfg.data, spec.num_features, "validation", fz), batch_format="pyarrow", batch_size=None,
        **cpus).map_batches(fn, batch_format="pyarrow", batch_size=None, **cpus)
    sketch = ScoreSketch(len(featurizer.columns))
    for b in beating(summaries.iter_batches(batch_format="pyarrow", batch_size=None)):
        for row in b.to_pylist():
            sketch.add(row)
    return sketch


def validation_sample(cfg: Config, storage: Storage, spec: InputSpec, featurizer: Optional[Featurizer] = None,
                      max_rows: int = PROJECTION_ROWS) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Up to `max_rows` validation rows read on the driver: (input slots, planted truth or None)."""
    fz = None if featurizer is None or featurizer.vector else featurizer
    width = featurizer.width if featurizer is not None else spec.num_features
    xs, truths, n, has_truth = [], [], 0, True
    for f in spec.files:
        with storage.open_parquet(f) as pf:
            has_truth = has_truth and TRUTH_COLUMN in pf.schema_arrow.names
            cols = spec.columns + ([TRUTH_COLUMN] if has_truth else [])
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                t = pa.Table.from_batches([batch])
                rows = batch_rows(t, cfg.data, spec.num_features, fz)
                keep = validation_mask(t, cfg.data, rows.split_key) & rows.keep
                xs.append(rows.x[keep])
                if has_truth:
                    truths.append(t.column(TRUTH_COLUMN).to_numpy(zero_copy_only=False)[keep].astype(bool))
                n += int(keep.sum())
                if n >= max_rows:
                    break
        if n >= max_rows:
            break
    x = np.concatenate(xs)[:max_rows] if xs else np.zeros((0, width), np.float32)
    truth = np.concatenate(truths)[:max_rows] if has_truth and truths else None
    return x, truth


def validation_projection(cfg: Config, storage: Storage, spec: InputSpec, featurizer: Featurizer,
                          manifest: dict[str, Any], model) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """A validation sample through the stored model: (codes, anomaly flags, planted truth or None)."""
    x, truth = validation_sample(cfg, storage, spec, featurizer)
    norm = Normalizer(featurizer.offset, featurizer.scale)
    with torch.inference_mode():
        score, h, _ = model.eval().score_and_latent(norm(torch.from_numpy(x)))
    return h.float().numpy(), score.float().numpy() > float(manifest["threshold"]), truth
