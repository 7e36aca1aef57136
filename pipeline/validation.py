"""Validation rows read on the driver, for what needs a sample of them rather than all (the threshold's pass
over every validation row runs in the training workers: pipeline/train/validate.py).

    validation_slots(cfg, storage, spec, featurizers)          a sample of validation rows as each featurizer's
                                                               input (the code alignment's rows)
    validation_projection(cfg, storage, spec, featurizer,      a sample of validation rows read on the driver,
                          manifest, model)                     their codes, flags and planted truth (for the
                                                               training report's charts)
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.featurizer import Featurizer
from pipeline.inputs import InputSpec
from pipeline.metrics import TRUTH_COLUMN
from pipeline.predictor import Predictor
from pipeline.rows import batch_rows, validation_mask, with_row_keys
from pipeline.storage import Storage

PROJECTION_ROWS = 4000  # enough points to see structure in a scatter, few enough to read on the driver


def _batches(cfg: Config, storage: Storage, f: str, pf, columns: list[str]) -> Iterator[pa.Table]:
    """File `f`'s rows in batches; without id columns, with each row's place (rows.ROW_KEY), which the split
    then hashes as the Ray Data passes do."""
    start, path = 0, storage.resolve(f)[1]
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        t = pa.Table.from_batches([batch])
        yield t if cfg.data.ids else with_row_keys(t, path, start)
        start += t.num_rows


def validation_sample(cfg: Config, storage: Storage, spec: InputSpec, featurizer: Featurizer,
                      max_rows: int = PROJECTION_ROWS) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Up to `max_rows` validation rows read on the driver: (input slots, planted truth or None)."""
    xs, truths, n, has_truth = [], [], 0, True
    for f in spec.files:
        with storage.open_parquet(f) as pf:
            has_truth = has_truth and TRUTH_COLUMN in pf.schema_arrow.names
            cols = spec.columns + ([TRUTH_COLUMN] if has_truth else [])
            for t in _batches(cfg, storage, f, pf, cols):
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
            for t in _batches(cfg, storage, f, pf, spec.columns):
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
