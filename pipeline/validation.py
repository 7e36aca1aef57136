"""The training run's validation pass: the best model scored on the held-out rows.

    validation_errors(cfg, storage, spec, state, featurizer)   a bounded-memory sketch of the per-row scores
                                                               (for the anomaly threshold) and per-column
                                                               error, on Ray Data
    validation_slots(cfg, storage, spec, featurizers)          a sample of validation rows as each featurizer's
                                                               input (the code alignment's rows)
    validation_projection(cfg, storage, spec, featurizer,      a sample of validation rows read on the driver,
                          manifest, model)                     their codes, flags and planted truth (for the
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
from pipeline.featurizer import Featurizer
from pipeline.inputs import InputSpec
from pipeline.metrics import TRUTH_COLUMN
from pipeline.predictor import Predictor, cached_predictor
from pipeline.read import read_dataset
from pipeline.rows import SplitFeatures, batch_rows, validation_mask
from pipeline.sketch import ScoreSketch, summary_table
from pipeline.storage import Storage
from pipeline.tensors import arrow_to_tensor
from pipeline.watchdog import beating

PROJECTION_ROWS = 4000  # enough points to see structure in a scatter, few enough to read on the driver


class ValidationSketch:
    """Ray Data function for the validation pass, in plain tasks: a block of `x` rows -> its one-row summary
    (pipeline/sketch.py).

    Tasks rather than an actor pool: nothing to wait for before the first block (an actor needing a whole
    `score.cpus_per_actor` on one node can wait indefinitely on a cluster that just lost a node), Ray retries a
    task lost with its node, and Ray's core worker logs an error-level line for every actor pool (it restarts
    pool actors from constructor arguments kept in the object store), which reads like a failure. Each worker
    process builds the model once per run and keeps it (predictor.cached_predictor)."""

    def __init__(self, model_settings: dict[str, Any], state: dict[str, torch.Tensor], featurizer: Featurizer,
                 batch_size: int, run_id: str, torch_threads: int = 1):
        self.model_settings, self.state, self.featurizer = model_settings, state, featurizer
        self.batch_size, self.run_id, self.torch_threads = batch_size, run_id, max(1, torch_threads)

    def predictor(self) -> Predictor:
        return cached_predictor(self.run_id, lambda: Predictor.from_state(self.model_settings, self.state,
                                                                          self.featurizer))

    def __call__(self, table: pa.Table) -> pa.Table:
        torch.set_num_threads(self.torch_threads)
        predict = self.predictor()
        parts = [predict(arrow_to_tensor(table.slice(i, self.batch_size)))
                 for i in range(0, table.num_rows, self.batch_size)]
        n_columns = len(self.featurizer.columns)  # per-column errors: one per input column
        scores = np.concatenate([p.score for p in parts]) if parts else np.zeros(0, np.float32)
        sq = np.concatenate([p.errors for p in parts]) if parts else np.zeros((0, n_columns), np.float32)
        return summary_table(scores, sq)


def validation_errors(cfg: Config, storage: Storage, spec: InputSpec, state, featurizer: Featurizer) -> ScoreSketch:
    """Sketch of the best model's per-row validation scores and per-column error (distributed).

    Each block is scored and summarized in one task; the driver merges fixed-size summaries, so its memory
    does not grow with the validation rows."""
    fn = ValidationSketch(dataclasses.asdict(cfg.model), state, featurizer, cfg.train.validation_batch_size,
                         uuid.uuid4().hex)
    # the CPUs the training workers held and released, at least one per task: more tasks than cores score no
    # faster, and each holds a block and the model
    cpus = {"num_cpus": max(1.0, cfg.train.cpus_per_worker)}
    summaries = read_dataset(spec, storage, **cpus).map_batches(
        SplitFeatures(cfg.data, spec.num_features, "validation", featurizer), batch_format="pyarrow",
        batch_size=None, **cpus).map_batches(fn, batch_format="pyarrow", batch_size=None, **cpus)
    sketch = ScoreSketch(len(featurizer.columns))
    for b in beating(summaries.iter_batches(batch_format="pyarrow", batch_size=None)):
        for row in b.to_pylist():
            sketch.add(row)
    return sketch


def validation_sample(cfg: Config, storage: Storage, spec: InputSpec, featurizer: Featurizer,
                      max_rows: int = PROJECTION_ROWS) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Up to `max_rows` validation rows read on the driver: (input slots, planted truth or None)."""
    xs, truths, n, has_truth = [], [], 0, True
    for f in spec.files:
        with storage.open_parquet(f) as pf:
            has_truth = has_truth and TRUTH_COLUMN in pf.schema_arrow.names
            cols = spec.columns + ([TRUTH_COLUMN] if has_truth else [])
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                t = pa.Table.from_batches([batch])
                rows = batch_rows(t, cfg.data, featurizer)
                keep = validation_mask(t, cfg.data, rows.split_key) & rows.keep
                xs.append(rows.x[keep])
                if has_truth:
                    truths.append(t.column(TRUTH_COLUMN).to_numpy(zero_copy_only=False)[keep].astype(bool))
                n += int(keep.sum())
                if n >= max_rows:
                    break
        if n >= max_rows:
            break
    x = np.concatenate(xs)[:max_rows] if xs else np.zeros((0, featurizer.width), np.float32)
    truth = np.concatenate(truths)[:max_rows] if has_truth and truths else None
    return x, truth


def validation_slots(cfg: Config, storage: Storage, spec: InputSpec, featurizers: list[Featurizer],
                     max_rows: int = PROJECTION_ROWS, validation: bool = True) -> list[np.ndarray]:
    """Up to `max_rows` validation rows (`validation=False`: training rows) read on the driver, as each
    featurizer's input slots (the same rows, in the same order: those every featurizer keeps). The first
    featurizer is the run's (it decides the split)."""
    xs: list[list[np.ndarray]] = [[] for _ in featurizers]
    n = 0
    for f in spec.files:
        with storage.open_parquet(f) as pf:
            for batch in pf.iter_batches(batch_size=8192, columns=spec.columns):
                t = pa.Table.from_batches([batch])
                rows = [batch_rows(t, cfg.data, fz) for fz in featurizers]
                keep = validation_mask(t, cfg.data, rows[0].split_key) == validation
                for r in rows:
                    keep &= r.keep
                for x, r in zip(xs, rows):
                    x.append(r.x[keep])
                n += int(keep.sum())
                if n >= max_rows:
                    break
        if n >= max_rows:
            break
    return [np.concatenate(x)[:max_rows] if x else np.zeros((0, fz.width), np.float32)
            for x, fz in zip(xs, featurizers)]


def validation_projection(cfg: Config, storage: Storage, spec: InputSpec, featurizer: Featurizer,
                          manifest: dict[str, Any], model) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """A validation sample through the stored model: (codes, anomaly flags, planted truth or None)."""
    x, truth = validation_sample(cfg, storage, spec, featurizer)
    pred = Predictor(model, featurizer)(x)
    return pred.latent, pred.score > float(manifest["threshold"]), truth
