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

from pipeline.storage import Storage
from pipeline.uri import join_uri, normalize_uri


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


# ------------------------------------------------------------------------------------------ a mixed table

COUNTRIES = ["US", "DE", "FR", "GB", "JP", "BR", "IN", "CA", "AU", "MX", "ES", "IT"]
CURRENCY = {"US": "USD", "DE": "EUR", "FR": "EUR", "GB": "GBP", "JP": "JPY", "BR": "BRL", "IN": "INR",
            "CA": "CAD", "AU": "AUD", "MX": "MXN", "ES": "EUR", "IT": "EUR"}
CHANNELS = ["web", "app", "store", "phone"]


def generate_mixed(rows: int, anomaly_fraction: float = 0.02, null_fraction: float = 0.03,
                   merchants: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """A transactions-like table: numeric columns on different scales, categoricals of low and high
    cardinality, a boolean, a few percent nulls; and planted anomalies, half of them numeric (a row pushed off
    the numeric manifold) and half categorical only (a currency that does not go with the country, or a
    card-present payment on the web), whose numeric columns are normal.

    Each row has a hidden customer segment; the segment drives the country, the channel, the merchant and
    the numeric columns, so the columns predict each other the way a real table's do."""
    rng = np.random.default_rng(seed)
    structure = np.random.default_rng(4321)  # the same table structure for every seed: shards share it
    n_seg = 6
    seg = rng.integers(0, n_seg, rows)
    country_p = structure.dirichlet(np.full(len(COUNTRIES), 0.3), size=n_seg)
    channel_p = structure.dirichlet(np.full(len(CHANNELS), 0.5), size=n_seg)
    merchant_p = structure.dirichlet(np.full(merchants, 0.05), size=n_seg)
    def draw(p: np.ndarray) -> np.ndarray:  # one level per row from its segment's distribution
        cdf = np.cumsum(p, axis=1)[seg]
        return np.minimum((cdf < rng.random((rows, 1))).sum(axis=1), p.shape[1] - 1)

    country, channel, merchant = draw(country_p), draw(channel_p), draw(merchant_p)
    x, _ = generate(rows, features=4, latent=2, anomaly_fraction=0.0, seed=seed)
    seg_shift = structure.normal(size=(n_seg, 4))
    base = x + seg_shift[seg] * np.abs(x).mean(axis=0)
    amount = np.exp(3.0 + 0.5 * seg + 0.3 * rng.normal(size=rows))  # 20 .. 500, per segment
    cols: dict[str, np.ndarray] = {
        "amount": amount.astype(np.float64),
        "items": np.maximum(1, np.round(amount / 40 + rng.normal(scale=0.5, size=rows))).astype(np.int64),
        "account_age_days": base[:, 0].astype(np.float64),
        "risk_score": base[:, 1].astype(np.float32),
        "latency_ms": base[:, 2].astype(np.float32),
        "balance": base[:, 3].astype(np.float64),
        "country": np.array(COUNTRIES, dtype=object)[country],
        "currency": np.array([CURRENCY[COUNTRIES[c]] for c in country], dtype=object),
        "channel": np.array(CHANNELS, dtype=object)[channel],
        "merchant": np.array([f"m{m:04d}" for m in merchant], dtype=object),
        "card_present": channel == CHANNELS.index("store"),
    }
    truth = _plant_anomalies(cols, rng, anomaly_fraction)
    # a few percent nulls, on normal rows only: a missing value is not what makes a planted row odd
    for c in ("account_age_days", "latency_ms", "channel", "merchant", "items"):
        cols[c + "__null"] = (rng.random(rows) < null_fraction) & ~truth
    return cols


def _plant_anomalies(cols: dict[str, np.ndarray], rng: np.random.Generator, anomaly_fraction: float) -> np.ndarray:
    """Plant generate_mixed's anomalies in `cols` (half numeric, half categorical only) and add the truth
    columns; returns the planted rows."""
    rows = len(cols["amount"])
    truth = rng.random(rows) < anomaly_fraction
    kind = np.full(rows, "", dtype=object)
    idx = np.flatnonzero(truth)
    rng.shuffle(idx)
    half = len(idx) // 2
    numeric, categorical = idx[:half], idx[half:]
    kind[numeric], kind[categorical] = "numeric", "categorical"
    spread = np.array([cols[c].std() for c in ("account_age_days", "risk_score", "latency_ms", "balance")])
    push = rng.normal(size=(len(numeric), 4))
    push *= (4.0 * spread) / np.linalg.norm(push, axis=1, keepdims=True)
    for j, c in enumerate(("account_age_days", "risk_score", "latency_ms", "balance")):
        cols[c][numeric] += push[:, j].astype(cols[c].dtype)
    wrong_currency, wrong_card = categorical[: len(categorical) // 2], categorical[len(categorical) // 2:]
    for i in wrong_currency:  # a currency no row of that country ever pays in
        own = CURRENCY[cols["country"][i]]
        cols["currency"][i] = rng.choice([c for c in sorted(set(CURRENCY.values())) if c != own])
    web = CHANNELS.index("web")
    cols["channel"][wrong_card] = CHANNELS[web]
    cols["card_present"][wrong_card] = True  # a card swiped through a web form
    cols["anomaly_kind"], cols["is_anomaly_truth"] = kind, truth
    return truth


def mixed_table(cols: dict[str, np.ndarray], lo: int, hi: int, start: dt.datetime) -> pa.Table:
    """Rows lo..hi of generate_mixed's columns as an Arrow table with ids and an event time."""
    def col(name: str, typ: pa.DataType) -> pa.Array:
        mask = cols.get(name + "__null")
        return pa.array(cols[name][lo:hi], typ, mask=None if mask is None else mask[lo:hi])

    return pa.table({
        "id": pa.array(np.arange(lo, hi, dtype=np.int64)),
        "event_time": pa.array((np.datetime64(start.replace(tzinfo=None), "us")
                                + np.arange(lo, hi) * np.timedelta64(1, "s")), pa.timestamp("us", tz="UTC")),
        "amount": col("amount", pa.float64()),
        "items": col("items", pa.int64()),
        "account_age_days": col("account_age_days", pa.float64()),
        "risk_score": col("risk_score", pa.float32()),
        "latency_ms": col("latency_ms", pa.float32()),
        "balance": col("balance", pa.float64()),
        "country": col("country", pa.string()),
        "currency": col("currency", pa.string()).dictionary_encode(),
        "channel": col("channel", pa.string()),
        "merchant": col("merchant", pa.string()),
        "card_present": col("card_present", pa.bool_()),
        "anomaly_kind": col("anomaly_kind", pa.string()),
        "is_anomaly_truth": col("is_anomaly_truth", pa.bool_()),
    })


def write_mixed_sample(uri: str, storage: Storage, rows: int = 20_000, shards: int = 4,
                       anomaly_fraction: float = 0.02, seed: int = 0, start: dt.datetime | None = None) -> list[str]:
    """Write the mixed table (generate_mixed) as `shards` Parquet files under `uri`. Returns the file URIs."""
    uri = normalize_uri(uri)
    start = start or dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cols = generate_mixed(rows, anomaly_fraction, seed=seed)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    files = []
    for s in range(shards):
        f_uri = join_uri(uri, f"part-{s:05d}.parquet")
        fs, path = storage.resolve(f_uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            pq.write_table(mixed_table(cols, bounds[s], bounds[s + 1], start), out)
        files.append(f_uri)
    return files
