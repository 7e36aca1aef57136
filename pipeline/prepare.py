"""The prepare pass: one distributed pass over the input before training, the same for every kind of table.

Per block (BatchStats, in Ray Data tasks): the rows through the featurizer, rejects written, the split
taken, and the training rows' mergeable statistics (pipeline/stats.py); on the driver, the merged statistics
fit the featurizer. The result is stored with the run (`prepare.json`), so a resumed run reuses it when
nothing it depends on changed (`prepare_key`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from pipeline.config import Config, DataSection
from pipeline.errors import InputError
from pipeline.featurizer import Featurizer
from pipeline.inputs import InputSpec
from pipeline.read import read_dataset
from pipeline.rows import RejectWriter, batch_rows, split_cut, split_position
from pipeline.stats import (ColumnMoments, DistinctKeys, LevelCounts, TableStats, counter_capacity,
                            normalization_stats, rare_flags)
from pipeline.storage import Storage
from pipeline.uri import join_uri
from pipeline.watchdog import beating

PREPARE = "prepare.json"
REJECTS = "rejects"  # <run>/rejects/: training rows dropped by data.nan_policy or data.missing `drop`, with the reason


class BatchStats:
    """Ray Data UDF: one row of partial statistics per batch (its training rows, as TableStats JSON in
    `stats`), plus its split and reject counts."""

    def __init__(self, data: DataSection, featurizer: Featurizer, on_reject: Optional[RejectWriter] = None):
        self.data, self.featurizer, self.on_reject = data, featurizer, on_reject

    def __call__(self, table: pa.Table) -> dict[str, Any]:
        fz, data = self.featurizer, self.data
        rows = batch_rows(table, data, fz)
        if self.on_reject is not None:
            self.on_reject(table, rows)
        u = split_position(table, data, rows.split_key)
        val = u < data.validation_fraction
        train = rows.keep & ~val
        kept = np.sort(u[rows.keep])
        cap = counter_capacity(data.max_categories)
        xnum = rows.raw[train]
        stats = TableStats(ColumnMoments.of(xnum), np.isnan(xnum).sum(axis=0).astype(np.int64),
                           [LevelCounts.of(table.column(c.name).filter(pa.array(train)), cap)
                            for c in fz.categorical_columns])
        return {
            "n": np.array([int(train.sum())], dtype=np.int64),
            "stats": np.array([stats.to_json()], dtype=object),
            "n_val": np.array([int((rows.keep & val).sum())], dtype=np.int64),
            "n_rejected": np.array([int((~rows.keep).sum())], dtype=np.int64),
            # the kept rows' lowest two and highest split places: a tiny input's split_cut
            "u_low": np.array([kept[0] if len(kept) else 1.0]),
            "u_second": np.array([kept[1] if len(kept) > 1 else 1.0]),
            "u_high": np.array([kept[-1] if len(kept) else -1.0]),
            # with id columns a row's place is its key's hash: the smallest distinct ones count the keys
            "keys": np.array([DistinctKeys.of(kept).smallest.tobytes() if data.ids else b""], dtype=object),
        }


def merge_stat_rows(rows: Iterable[dict[str, Any]], featurizer: Featurizer,
                    max_categories: int) -> tuple[TableStats, int, int, int]:
    """(merged statistics, train rows, validation rows, rejected rows) from BatchStats' rows, in any order."""
    total = TableStats.empty(len(featurizer.numeric_columns), len(featurizer.categorical_columns))
    n = n_val = n_rej = 0
    for r in rows:
        total = total.merge(TableStats.from_json(str(r["stats"])), counter_capacity(max_categories))
        n, n_val, n_rej = n + int(r["n"]), n_val + int(r["n_val"]), n_rej + int(r["n_rejected"])
    return total, n, n_val, n_rej


def split_ends(rows: Iterable[dict[str, Any]]) -> tuple[float, float, float]:
    """The kept rows' lowest two and highest split places over BatchStats' rows (`rows.split_cut`)."""
    lows, high = [1.0, 1.0], -1.0
    for r in rows:
        lows, high = sorted([*lows, float(r["u_low"]), float(r["u_second"])])[:2], max(high, float(r["u_high"]))
    return lows[0], lows[1], high


def distinct_keys(rows: Iterable[dict[str, Any]]) -> DistinctKeys:
    """The kept rows' distinct keys over BatchStats' rows (none without id columns)."""
    total = DistinctKeys()
    for r in rows:
        total = total.merge(DistinctKeys.from_bytes(r["keys"]))
    return total


def compute_stats(spec: InputSpec, data: DataSection, storage: Storage,
                  rejects_uri: Optional[str] = None) -> tuple[TableStats, int, int, int, float, DistinctKeys]:
    """One distributed pass: (statistics of the training rows, train, validation, rejected rows, the split's
    cut, the distinct keys). With `rejects_uri` (and a `drop` policy), the dropped rows are written there with
    the reason.

    On a tiny input whose split left no validation or no training rows (a few rows, each hashed to one side),
    the cut moves so that one row is on the empty side (`rows.split_cut`), and the pass runs again with it:
    the statistics are of the training rows."""
    rows, keys = _stat_rows(spec, data, storage, rejects_uri)
    n_train, n_val = (sum(int(r[k]) for r in rows) for k in ("n", "n_val"))
    cut = split_cut(data.validation_fraction, n_train, n_val, split_ends(rows))
    if cut != data.validation_fraction:
        if rejects_uri:
            storage.delete_dir(rejects_uri)  # the pass writes them again
        rows, keys = _stat_rows(spec, dataclasses.replace(data, validation_fraction=cut), storage, rejects_uri)
    return (*merge_stat_rows(rows, spec.featurizer, data.max_categories), cut, keys)


def _stat_rows(spec: InputSpec, data: DataSection, storage: Storage,
               rejects_uri: Optional[str]) -> tuple[list[dict[str, Any]], DistinctKeys]:
    """BatchStats' rows over the input, one per block, and their distinct keys (merged as the rows arrive, so
    the driver holds one key sample, not one per block)."""
    on_reject = RejectWriter(storage, rejects_uri, data) if rejects_uri and data.drops_rows else None
    ds = read_dataset(spec, storage, row_keys=True).map_batches(BatchStats(data, spec.featurizer, on_reject),
                                                                batch_format="pyarrow", batch_size=None)
    rows, keys = [], DistinctKeys()
    for batch in beating(ds.iter_batches(batch_format="numpy", batch_size=None)):
        for i in range(len(batch["n"])):
            rows.append({k: batch[k][i] for k in batch if k != "keys"})
            keys = keys.merge(DistinctKeys.from_bytes(batch["keys"][i]))
    return rows, keys


def prepare_key(spec: InputSpec, data: DataSection) -> dict[str, Any]:
    """What the pass's result depends on: every data setting (features resolved), the input's files and rows,
    the features' roles. Any change to them recomputes the pass (as JSON, the form it is stored in)."""
    key = {"data": dataclasses.asdict(data), "input": spec.uri, "files": spec.file_rows,
           "features": spec.feature_names, "roles": [dataclasses.asdict(r) for r in spec.roles],
           # without ids the split hashes each row's place (rows.ROW_KEY); a pass from before split by values
           "split": "ids" if data.ids else "row place"}
    return json.loads(json.dumps(key))


def prepare(cfg: Config, storage: Storage, spec: InputSpec) -> dict[str, Any]:
    """The fitted featurizer (normalization, levels) and split counts; stored with the run so a resumed run
    reuses them."""
    uri = join_uri(cfg.run_uri, PREPARE)
    data = spec.data or cfg.data
    key = prepare_key(spec, data)
    if storage.exists(uri):
        prev = storage.read_json(uri)
        if prev.get("key") == key:
            print(f"[prepare] reusing normalization statistics from {uri}", flush=True)
            return prev
    t0 = time.perf_counter()
    rejects_uri = join_uri(cfg.run_uri, REJECTS)
    storage.delete_dir(rejects_uri)  # a recomputed pass rewrites them all
    stats, n_train, n_val, n_rej, cut, keys = compute_stats(spec, data, storage, rejects_uri)
    offset, scale = normalization_stats(stats.numeric)
    with warnings.catch_warnings(record=True) as caught:  # a column's warning, in the job's own words
        warnings.simplefilter("always")
        featurizer = spec.featurizer.fit(stats, offset, scale, data.max_categories, data.missing)
    for w in caught:
        print(f"[prepare] warning: {w.message}", flush=True)
    if not (n_train and n_val):  # before training: the threshold and the score's weights are fitted on them
        n = n_train + n_val
        if n > 1:  # rows the split cannot tell apart: one key for all of them
            raise InputError(f"data.input {spec.uri}: all {n} rows share one key in data.id_columns "
                             f"({', '.join(data.ids)}), so the split cannot hold any out; set data.id_columns to "
                             "columns that tell the rows apart")
        raise InputError(f"data.input {spec.uri}: {n} row{'s' * (n != 1)} to learn from ({n_rej} rejected); the "
                         "job needs two or more, at least one to train on and one to validate on")
    prep = {"key": key, "mean": featurizer.offset.tolist(), "scale": featurizer.scale.tolist(),
            "features": featurizer.to_dict(), "train_rows": n_train, "validation_rows": n_val,
            "validation_cut": cut, "rejected_rows": n_rej, "rejects": rejects_uri if n_rej else None}
    storage.write_json(uri, prep)
    flags = int(rare_flags(stats.numeric).sum())
    print(f"[prepare] {spec.num_rows} rows in {len(spec.files)} files: {n_train} train, {n_val} validation, "
          f"{n_rej} rejected; statistics in {time.perf_counter() - t0:.1f}s"
          + (f"; a table of flags: {flags} rare flags scaled by half their range" if flags else ""), flush=True)
    if data.ids:
        _say_shared_keys(data, n_train + n_val, *keys.count())
    if cut != data.validation_fraction:
        print(f"[prepare] data.validation_fraction {data.validation_fraction:g} put all {n_train + n_val} rows on one "
              f"side of the split, so the row at its end is on the other ({n_train} train, {n_val} validation)",
              flush=True)
    return prep


SHARED_KEYS_WARN = 0.9
"""Above KEY_SAMPLE keys, where they are estimated (about 1.6% off), the job warns once the estimate is below
this share of the rows: six standard deviations, so that a table of unique keys never reads as one that
repeats them. Counted exactly, one repeated key is enough."""


def _say_shared_keys(data: DataSection, n: int, keys: int, exact: bool) -> None:
    """A warning where rows share keys: the output then holds several rows per key, which a reader joining on
    the key (a feature store's entity) cannot tell apart. A table of a partition a day, read whole, is one."""
    if keys >= n or (not exact and keys >= SHARED_KEYS_WARN * n):
        return
    many = f"{keys:,}" if exact else f"about {keys:,}"
    print(f"[prepare] warning: the {n:,} rows have {many} distinct keys in data.id_columns ({', '.join(data.ids)}):"
          " the output holds more than one row for some keys, which a reader joining on them cannot tell apart; "
          "set data.id_columns to columns that tell the rows apart (a date, written into the files)", flush=True)
