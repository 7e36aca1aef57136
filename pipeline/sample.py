"""Synthetic tabular data for demos and tests: rows near a low-dimensional nonlinear manifold, plus noise,
with a small fraction of planted anomalies flagged in `is_anomaly_truth`.

A normal row is x = A tanh(B z + c) + eps, with z ~ N(0, I_k) (k = `latent`), fixed random A, B, c and
small Gaussian noise eps, then each feature is given its own scale and offset (features on wildly different
scales are part of the test). An anomaly is either a normal row pushed off the manifold by a large random
offset, or a row whose features are shuffled across positions (right marginals, wrong joint).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Storage, join_uri, normalize_uri


def generate(rows: int, features: int = 32, latent: int = 3, anomaly_fraction: float = 0.01, noise: float = 0.05,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (rows, features), truth bool (rows,))."""
    rng = np.random.default_rng(seed)
    structure = np.random.default_rng(1234)  # the manifold is the same for every seed: shards share it
    hidden = max(2 * latent, 8)
    B = structure.normal(size=(latent, hidden))
    c = structure.normal(scale=0.5, size=hidden)
    A = structure.normal(size=(hidden, features)) / np.sqrt(hidden)
    scales = 10.0 ** structure.uniform(-2, 3, size=features)  # 0.01 .. 1000
    offsets = structure.normal(scale=5.0, size=features) * scales
    z = rng.normal(size=(rows, latent))
    clean = np.tanh(z @ B + c) @ A
    x = clean + rng.normal(scale=noise, size=clean.shape)
    truth = rng.random(rows) < anomaly_fraction
    idx = np.flatnonzero(truth)
    half = len(idx) // 2
    push = rng.normal(size=(half, features))
    push *= 1.0 / np.linalg.norm(push, axis=1, keepdims=True)
    x[idx[:half]] += push * rng.uniform(1.0, 2.0, size=(half, 1))
    for i in idx[half:]:
        x[i] = x[i, rng.permutation(features)]
    return (x * scales + offsets).astype(np.float32), truth


def write_sample(uri: str, storage: Storage, rows: int = 20_000, shards: int = 4, features: int = 32,
                 latent: int = 3, anomaly_fraction: float = 0.01, seed: int = 0, layout: str = "vector",
                 start: dt.datetime | None = None) -> list[str]:
    """Write `shards` Parquet files under `uri`; ids are unique across shards. Returns the file URIs."""
    uri = normalize_uri(uri)
    start = start or dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    x, truth = generate(rows, features, latent, anomaly_fraction, seed=seed)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    files = []
    for s in range(shards):
        lo, hi = bounds[s], bounds[s + 1]
        n = hi - lo
        cols = {
            "id": pa.array(np.arange(lo, hi, dtype=np.int64)),
            "event_time": pa.array((np.datetime64(start.replace(tzinfo=None), "us")
                                    + np.arange(lo, hi) * np.timedelta64(1, "s")), pa.timestamp("us", tz="UTC")),
        }
        if layout == "vector":
            offsets = pa.array(np.arange(0, (n + 1) * features, features, dtype=np.int32))
            cols["features"] = pa.ListArray.from_arrays(offsets, pa.array(x[lo:hi].reshape(-1)))
        elif layout == "fixed":
            cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1)), features)
        else:
            for j in range(features):
                cols[f"f{j:02d}"] = pa.array(x[lo:hi, j])
        cols["is_anomaly_truth"] = pa.array(truth[lo:hi])
        table = pa.table(cols)
        f_uri = join_uri(uri, f"part-{s:05d}.parquet")
        fs, path = storage.resolve(f_uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            pq.write_table(table, out)
        files.append(f_uri)
    return files
