"""Bounded-memory summaries of per-row validation scores, merged from batches and from the training ranks.

The threshold is a high quantile (q0.99) of every validation row's score. Collecting the scores to the
driver for `np.quantile` costs memory that grows with the rows (4 bytes a row: 400 MB for 100M validation
rows). Instead each batch is summarized where it was scored (in the training workers, pipeline/train/validate.py),
the ranks' sketches merge on rank 0, and the driver gets one fixed-size summary:

- `ScoreSketch`: counts on a fixed grid of float32 buckets. A score's bucket is its IEEE-754 bit pattern
  (made order-preserving for negative scores) with the low `DROP_BITS` mantissa bits dropped, so every
  bucket spans a relative width of 2**-(23 - DROP_BITS) = 2**-11 (0.05%) of its values: a quantile read
  off the grid is within 0.05% (relative) of an order statistic next to the exact one. The grid has
  2**(32 - DROP_BITS) = 1,048,576 buckets (8 MB of int64), whatever the rows.
- a uniform sample of at most `SAMPLE_ROWS` scores (a random key per row, the smallest keys kept), for the
  training report's plots.

Both merge exactly: the merged sketch of all blocks equals the sketch of all rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

DROP_BITS = 12
"""Mantissa bits dropped per bucket: relative bucket width 2**-11 (float32 has 23 mantissa bits)."""
N_BUCKETS = 1 << (32 - DROP_BITS)
SAMPLE_ROWS = 100_000
"""Scores kept (uniformly at random) for the training report's plots."""


def ordered_keys(values: np.ndarray) -> np.ndarray:
    """float32 values -> uint32 keys with the same order (negative floats' bits count down, so flip them)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    neg = (bits >> 31).astype(bool)
    return np.where(neg, ~bits, bits | np.uint32(0x80000000))


def key_values(keys: np.ndarray) -> np.ndarray:
    """The inverse of `ordered_keys`: uint32 keys -> float32 values."""
    keys = np.asarray(keys, np.uint32)
    pos = (keys >> 31).astype(bool)
    return np.where(pos, keys & np.uint32(0x7FFFFFFF), ~keys).view(np.float32)


def bucket_bounds(buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) float value of each bucket, as float64."""
    b = np.asarray(buckets, np.uint64)
    lo = key_values((b << np.uint64(DROP_BITS)).astype(np.uint32)).astype(np.float64)
    hi = key_values(((b << np.uint64(DROP_BITS)) | np.uint64((1 << DROP_BITS) - 1)).astype(np.uint32))
    return np.minimum(lo, hi.astype(np.float64)), np.maximum(lo, hi.astype(np.float64))


def summarize_block(scores: np.ndarray, sq_error: np.ndarray, seed: Optional[int] = None) -> dict[str, Any]:
    """One block's summary: its occupied buckets and their counts, the per-feature squared-error sum,
    min/max, and its sample candidates (scores with random keys; the driver keeps the smallest keys)."""
    s = np.asarray(scores, np.float32)
    s = s[np.isfinite(s)]
    buckets, counts = np.unique(ordered_keys(s) >> np.uint32(DROP_BITS), return_counts=True)
    rng = np.random.default_rng(seed)
    keys = rng.random(len(s))
    if len(s) > SAMPLE_ROWS:
        keep = np.argpartition(keys, SAMPLE_ROWS - 1)[:SAMPLE_ROWS]
        sample, keys = s[keep], keys[keep]
    else:
        sample = s
    return {"buckets": buckets.astype(np.int64), "counts": counts.astype(np.int64),
            "sq_sum": np.asarray(sq_error, np.float64).sum(axis=0) if len(sq_error) else np.zeros(0),
            "rows": int(len(scores)), "min": float(s.min()) if len(s) else np.inf,
            "max": float(s.max()) if len(s) else -np.inf, "pos_min": float(s[s > 0].min()) if (s > 0).any() else np.inf,
            "sample": sample, "sample_keys": keys}


@dataclass
class ScoreSketch:
    """Merged summary of every validation row's score; memory fixed by N_BUCKETS and SAMPLE_ROWS."""

    n_features: int
    counts: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, np.int64))
    sq_sum: np.ndarray = None  # type: ignore[assignment]
    rows: int = 0
    lo: float = np.inf
    hi: float = -np.inf
    pos_min: float = np.inf
    """Smallest positive score (the report's log-spaced histogram starts below it)."""
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    sample_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    def __post_init__(self) -> None:
        if self.sq_sum is None:
            self.sq_sum = np.zeros(self.n_features, np.float64)

    @classmethod
    def of(cls, scores: np.ndarray, sq_error: Optional[np.ndarray] = None, seed: Optional[int] = 0) -> "ScoreSketch":
        """The sketch of `scores` in one go (tests, small data)."""
        scores = np.asarray(scores, np.float32)
        sq = sq_error if sq_error is not None else np.zeros((len(scores), 1), np.float32)
        sk = cls(sq.shape[1])
        sk.add(summarize_block(scores, sq, seed))
        return sk

    def add(self, block: dict[str, Any]) -> None:
        np.add.at(self.counts, np.asarray(block["buckets"], np.int64), np.asarray(block["counts"], np.int64))
        if len(block["sq_sum"]):  # an empty block's sum has no feature axis
            self.sq_sum += np.asarray(block["sq_sum"], np.float64)
        self.rows += int(block["rows"])
        self.lo, self.hi = min(self.lo, float(block["min"])), max(self.hi, float(block["max"]))
        self.pos_min = min(self.pos_min, float(block["pos_min"]))
        sample = np.concatenate([self.sample, np.asarray(block["sample"], np.float32)])
        keys = np.concatenate([self.sample_keys, np.asarray(block["sample_keys"], np.float64)])
        if len(sample) > SAMPLE_ROWS:
            keep = np.argpartition(keys, SAMPLE_ROWS - 1)[:SAMPLE_ROWS]
            sample, keys = sample[keep], keys[keep]
        self.sample, self.sample_keys = sample, keys

    def summary(self) -> dict[str, Any]:
        """The sketch as one block's summary (what `add` takes): the occupied buckets and their counts, the
        sums, extremes and sample. Sparse: a sketch of few rows stays small, e.g. on its way between processes."""
        nz = np.flatnonzero(self.counts)
        return {"buckets": nz.astype(np.int64), "counts": self.counts[nz], "sq_sum": self.sq_sum.copy(),
                "rows": self.rows, "min": self.lo, "max": self.hi, "pos_min": self.pos_min,
                "sample": self.sample.copy(), "sample_keys": self.sample_keys.copy()}

    @classmethod
    def merged(cls, n_features: int, blocks: Iterable[dict[str, Any]]) -> "ScoreSketch":
        """The sketch of several blocks' summaries (arrays or tensors)."""
        sk = cls(n_features)
        for block in blocks:
            sk.add(block)
        return sk

    @property
    def finite_rows(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q) -> np.ndarray | float:
        """Quantile(s) of the scores, as `np.quantile` would give them (linear interpolation between order
        statistics), to within a bucket: 2**-11 relative, clamped to the exact min and max."""
        qs = np.atleast_1d(np.asarray(q, np.float64))
        n = self.finite_rows
        if n == 0:
            out = np.full(len(qs), np.nan)
            return out if np.ndim(q) else float(out[0])
        nz = np.flatnonzero(self.counts)
        cum = np.cumsum(self.counts[nz])
        lo, hi = bucket_bounds(nz)
        out = np.empty(len(qs))
        for i, qi in enumerate(qs):
            rank = qi * (n - 1)  # 0-based fractional rank, as np.quantile's default method
            out[i] = self._value_at(int(np.floor(rank)), n, cum, lo, hi) * (1 - (rank % 1)) + \
                self._value_at(int(np.ceil(rank)), n, cum, lo, hi) * (rank % 1)
        out = np.clip(out, self.lo, self.hi)
        return out if np.ndim(q) else float(out[0])

    def _value_at(self, rank: int, n: int, cum: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
        """The `rank`-th smallest score (0-based), placed by its position among its bucket's counts; the
        smallest and the largest are known exactly."""
        if rank <= 0:
            return self.lo
        if rank >= n - 1:
            return self.hi
        j = int(np.searchsorted(cum, rank, side="right"))
        before = int(cum[j - 1]) if j else 0
        inside = (rank - before + 0.5) / (int(cum[j]) - before)
        return float(lo[j] + (hi[j] - lo[j]) * inside)

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Counts on `edges` (values outside land in the end bins), each bucket counted at its midpoint."""
        nz = np.flatnonzero(self.counts)
        lo, hi = bucket_bounds(nz)
        e = np.asarray(edges, np.float64)
        mid = np.clip((lo + hi) / 2, e[0], e[-1])
        return np.histogram(mid, bins=e, weights=self.counts[nz])[0].astype(np.int64)


def error_histogram_of(sk: ScoreSketch) -> dict[str, list[float]]:
    """`report.error_histogram` of the sketched scores: the same edges (from the exact min/max), counts and
    deciles read off the sketch."""
    from pipeline.report import HIST_BINS, histogram_edges

    edges = histogram_edges(sk.pos_min if np.isfinite(sk.pos_min) else None,
                            sk.hi if np.isfinite(sk.hi) else None, HIST_BINS)
    deciles = sk.quantile(np.linspace(0.1, 0.9, 9)) if sk.finite_rows else np.zeros(9)
    return {"edges": edges.tolist(), "counts": sk.histogram(edges).tolist(), "deciles": list(map(float, deciles))}
