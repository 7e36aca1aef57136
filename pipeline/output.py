"""The scored output's format: its schema (the one declaration of it) and the columns of a scored batch.

The README's "Output schema" and "Feature-store ingestion" tables are checked against `output_schema` by
tests/test_docs.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataSection, OutputSection

UTC_US = pa.timestamp("us", tz="UTC")


def output_schema(id_fields: Sequence[pa.Field], latent_dim: int, output: OutputSection) -> pa.Schema:
    """The scored output's columns, in order; the one declaration of the output format.

    <id columns>       as in the input, unchanged
    latent             list<float32> of length latent_dim (a plain list: feature stores read it)
    z_0 … z_{k-1}      float32, the latent code as scalar columns (only with output.flat_latent)
    recon_error        float32, the row's reconstruction error: the mean of its per-column errors (each input
                       column counted once; an ensemble: its models' mean)
    anomaly_score      float32, the model's anomaly score (`model.score`), which ranks the rows
    is_anomaly         bool, anomaly_score > the threshold stored in the model manifest
    feature_errors     list<float32>, the error of each input column, in data.features order (only with
                       output.feature_errors): squared normalized error, cross-entropy for a categorical
    top_features       list<string>, the output.top_k_features columns with the largest error, largest first
    model_version      string, `<run.name>@<weights sha256 prefix>`
    code_space         string, the model version whose coordinates `latent` uses (model_version itself unless
                       the model was aligned to a previous one: pipeline/alignment.py)
    event_timestamp    timestamp[us, UTC]: `data.timestamp_column`, else the run's as-of time
    scored_at          timestamp[us, UTC]
    """
    fields = [pa.field(f.name, f.type) for f in id_fields]  # the type only: input field metadata stays behind
    fields.append(pa.field("latent", pa.list_(pa.float32())))
    if output.flat_latent:
        fields += [pa.field(f"z_{i}", pa.float32()) for i in range(latent_dim)]
    fields += [pa.field("recon_error", pa.float32()), pa.field("anomaly_score", pa.float32()),
               pa.field("is_anomaly", pa.bool_())]
    if output.feature_errors:
        fields.append(pa.field("feature_errors", pa.list_(pa.float32())))
    if output.top_k_features:
        fields.append(pa.field("top_features", pa.list_(pa.string())))
    fields += [pa.field("model_version", pa.string()), pa.field("code_space", pa.string()),
               pa.field("event_timestamp", UTC_US),
               pa.field("scored_at", UTC_US)]
    return pa.schema(fields)


def latent_list(h: np.ndarray) -> pa.ListArray:
    """(rows, k) float32 -> list<float32> (not fixed-size: Feast and most readers want a plain list)."""
    n, k = h.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(h, np.float32).reshape(-1)))


def to_utc(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any timestamp/date column as timestamp[us, UTC]; naive timestamps are taken to be UTC."""
    t = arr.type
    if pa.types.is_date(t):
        arr = arr.cast(pa.timestamp("us"))
        t = arr.type
    if pa.types.is_timestamp(t) and t.tz is None:
        arr = pc.assume_timezone(arr.cast(pa.timestamp("us")), "UTC")
    return arr.cast(UTC_US)


def explanation_columns(h: np.ndarray, sq: np.ndarray, feature_names: list[str],
                        output: OutputSection) -> dict[str, pa.Array]:
    """The optional columns: flat latent `z_i`, `feature_errors` and `top_features`, as `output` asks."""
    cols: dict[str, pa.Array] = {}
    if output.flat_latent:
        for i in range(h.shape[1]):
            cols[f"z_{i}"] = pa.array(np.ascontiguousarray(h[:, i], np.float32))
    if output.feature_errors:
        cols["feature_errors"] = latent_list(sq)
    k = min(output.top_k_features, sq.shape[1])
    if k:
        # argpartition finds the k largest in O(d); only those k are then sorted, largest first
        top = np.argpartition(-sq, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sq, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        names = np.asarray(feature_names, dtype=object)[top.reshape(-1)]
        offsets = pa.array(np.arange(0, (len(sq) + 1) * k, k, dtype=np.int32))
        cols["top_features"] = pa.ListArray.from_arrays(offsets, pa.array(names, pa.string()))
    return cols


def timestamp_us(t: dt.datetime) -> int:
    """Microseconds since the epoch; a naive time is taken to be UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1_000_000)


def scored_table(table: pa.Table, score: np.ndarray, latent: np.ndarray, errors: np.ndarray, feature_names: list[str],
                 threshold: np.float32, version: str, data: DataSection, output: OutputSection, as_of: dt.datetime,
                 scored_at: dt.datetime, code_space: Optional[str] = None) -> pa.Table:
    """The output rows of the scored input rows `table`, in `output_schema`'s order (`code_space`: the
    version whose coordinates `latent` uses; None: `version`'s own)."""
    n = len(score)
    cols: dict[str, Any] = {c: table.column(c) for c in data.ids}
    cols["latent"] = latent_list(latent)
    cols.update(explanation_columns(latent, errors, feature_names, output))
    cols["recon_error"] = pa.array(errors.mean(axis=1, dtype=np.float64), pa.float32())
    cols["anomaly_score"] = pa.array(score, pa.float32())
    cols["is_anomaly"] = pa.array(score > threshold)
    cols["model_version"] = pa.array([version] * n, pa.string())
    cols["code_space"] = pa.array([code_space or version] * n, pa.string())
    if data.event_time:
        cols["event_timestamp"] = to_utc(table.column(data.event_time))
    else:
        cols["event_timestamp"] = pa.array(np.full(n, timestamp_us(as_of), dtype=np.int64), UTC_US)
    cols["scored_at"] = pa.array(np.full(n, timestamp_us(scored_at), dtype=np.int64), UTC_US)
    schema = output_schema([table.schema.field(c) for c in data.ids], latent.shape[1], output)
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)
