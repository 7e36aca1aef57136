"""Mergeable statistics of the training rows, gathered block by block in the prepare pass.

    ColumnMoments   count, mean, squared deviations and range per numeric input (NaN = missing)
    LevelCounts     a categorical column's level frequencies, bounded
    TableStats      both, plus the nulls per numeric input; merged on the driver in any order
    DistinctKeys    how many distinct keys the rows have (exact up to KEY_SAMPLE of them, estimated above)
    normalization_stats(moments)   the (offset, scale) the model's input is normalized with
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.roles import as_strings


MIN_LEVEL_COUNT = 2
"""Training rows a level needs for a slot of its own: a value seen once is no level a model can learn."""


TWO_VALUED_RTOL = 1e-6
"""How close (relative) a column's variance must come to the Bhatia-Davis bound to count as two-valued: float
rounding of the merged moments, not a third value (one in a million rows would still stay below it)."""


FLAG_TABLE_RARER_VALUES = 1.0
"""A table of flags (`rare_flags`): its rows carry at least this many rarer values of two-valued inputs on
average. Of the 31 benchmark tables, five with 9 to 1,555 flags carry 2.3 to 13.7; the others, and every digit
class of the novelty tasks, 0.61 at most (docs/evaluation.md, fourteenth round)."""

RARE_FLAG_SHARE = 0.01
"""A flag of a table of flags is rare when its rarer value is in fewer than this share of rows: the share of
rows the anomaly threshold (q0.99) flags; set, such a flag stands sqrt(0.99 / 0.01) ~ 10 standard deviations
out or more."""


KEY_SAMPLE = 4096
"""Smallest key hashes a DistinctKeys keeps: distinct keys are counted exactly up to this many, and estimated
above it to about 1/sqrt(4096) = 1.6% (one standard deviation; the k-minimum-values estimate)."""


@dataclass
class DistinctKeys:
    """The KEY_SAMPLE smallest distinct key hashes (uniform in [0, 1): `rows.split_position` with id columns).
    Merged in any order, it keeps the union's smallest, so the count of the whole input needs one pass and
    KEY_SAMPLE floats per block."""

    smallest: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(cls, positions: np.ndarray) -> "DistinctKeys":
        return cls(np.unique(positions)[:KEY_SAMPLE])

    @classmethod
    def from_bytes(cls, raw: bytes) -> "DistinctKeys":
        """A sample sent as `smallest.tobytes()` (a Ray Data column holds it as bytes)."""
        return cls(np.frombuffer(raw, dtype=np.float64))

    def merge(self, other: "DistinctKeys") -> "DistinctKeys":
        return DistinctKeys.of(np.concatenate([self.smallest, other.smallest]))

    def count(self) -> tuple[int, bool]:
        """(distinct keys, exact): exact below KEY_SAMPLE; above it (k - 1) / the k-th smallest hash."""
        if len(self.smallest) < KEY_SAMPLE:
            return len(self.smallest), True
        return int(round((KEY_SAMPLE - 1) / float(self.smallest[-1]))), False


def counter_capacity(max_categories: int) -> int:
    """Distinct levels a counter keeps: well above the levels kept, so the top ones survive any block split;
    bounded, so a column of ids mistaken for a category cannot exhaust memory."""
    return max(1024, 16 * max_categories)


@dataclass
class LevelCounts:
    """Frequencies of a categorical column's levels, bounded to `capacity` distinct levels.

    Merging sums the counts and keeps the `capacity` largest (ties by level, so the result does not depend on
    the order of blocks); while no block or merge goes over the bound, merging is exactly associative. Over
    it, the rarest levels are dropped (`truncated`): the frequent ones, the only ones one-hot encoded, stay."""

    counts: dict[str, int] = field(default_factory=dict)
    missing: int = 0
    truncated: bool = False

    @classmethod
    def of(cls, arr: Union[pa.Array, pa.ChunkedArray], capacity: int) -> "LevelCounts":
        s = as_strings(arr)
        vc = pc.value_counts(s.drop_null())
        counts = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))
        return cls(counts, s.null_count)._bound(capacity)

    def merge(self, other: "LevelCounts", capacity: int) -> "LevelCounts":
        counts = dict(self.counts)
        for k, v in other.counts.items():
            counts[k] = counts.get(k, 0) + v
        return LevelCounts(counts, self.missing + other.missing, self.truncated or other.truncated)._bound(capacity)

    def _bound(self, capacity: int) -> "LevelCounts":
        if len(self.counts) > capacity:
            keep = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:capacity]
            return LevelCounts(dict(keep), self.missing, True)
        return self

    def top(self, k: int) -> list[str]:
        """The levels one-hot encoded: at most the k most frequent, most frequent first, each seen at least
        MIN_LEVEL_COUNT times, and never part of a tie at the cut (levels as frequent as the first one left out
        are left out too). The rest share `other`.

        Which levels get a slot must not depend on their names: a column of ids (every value once) would
        otherwise keep k arbitrary values, and their rows, each the only one with its level, would top the
        anomaly ranking while the other rows, just as unique, share a common `other`."""
        ranked = [kv for kv in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
                  if kv[1] >= MIN_LEVEL_COUNT]
        if len(ranked) > k:
            cut = ranked[k][1]
            ranked = [kv for kv in ranked[:k] if kv[1] > cut]
        return [lv for lv, _ in ranked]


@dataclass
class ColumnMoments:
    """Per-input count, mean, sum of squared deviations, minimum and maximum over the values present (NaN =
    missing), merged with Chan et al.'s parallel rule input by input."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    lo: np.ndarray
    """Smallest value present (+inf where none)."""
    hi: np.ndarray
    """Largest value present (-inf where none)."""

    @classmethod
    def empty(cls, k: int) -> "ColumnMoments":
        return cls(np.zeros(k, np.int64), np.zeros(k), np.zeros(k), np.full(k, np.inf), np.full(k, -np.inf))

    @classmethod
    def of(cls, x: np.ndarray) -> "ColumnMoments":
        x64 = x.astype(np.float64)
        if x64.shape[0] == 0:
            return cls.empty(x64.shape[1])
        present = ~np.isnan(x64)
        if present.all():  # the common case (every vector column): one mean and one pass over the block
            n = np.full(x64.shape[1], x64.shape[0], np.int64)
            mean = x64.mean(axis=0)
            return cls(n, mean, ((x64 - mean) ** 2).sum(axis=0), x64.min(axis=0), x64.max(axis=0))
        n = present.sum(axis=0)
        total = np.where(present, x64, 0.0).sum(axis=0)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        m2 = (np.where(present, x64 - mean, 0.0) ** 2).sum(axis=0)
        lo, hi = np.where(present, x64, np.inf).min(axis=0), np.where(present, x64, -np.inf).max(axis=0)
        return cls(n.astype(np.int64), mean, m2, lo, hi)

    def merge(self, other: "ColumnMoments") -> "ColumnMoments":
        n = self.n + other.n
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        mean = np.where(self.n == 0, other.mean, np.where(other.n == 0, self.mean,
                                                         self.mean + delta * (other.n / safe)))
        m2 = self.m2 + other.m2 + delta ** 2 * (self.n * other.n / safe)
        return ColumnMoments(n, mean, m2, np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.n - 1, 1))

    @property
    def two_valued(self) -> np.ndarray:
        """Inputs whose every value is their minimum or their maximum (two distinct values): the variance
        reaches the Bhatia-Davis bound (max - mean)(mean - min), which only such a column does."""
        with np.errstate(invalid="ignore"):  # inf - inf where an input has no value: not two-valued
            bound = (self.hi - self.mean) * (self.mean - self.lo)
            return (self.hi > self.lo) & (self.m2 / np.maximum(self.n, 1) >= bound * (1 - TWO_VALUED_RTOL))


def normalization_stats(m: ColumnMoments) -> tuple[np.ndarray, np.ndarray]:
    """(offset, scale) as float32: each input's training mean and standard deviation, except that

    - a constant input gets scale 1, so it normalizes to 0, not to NaN;
    - in a table of flags, a flag whose rarer value is in under 1% of rows (`rare_flags`) is scaled by half
      the distance between its two values, as a balanced flag would be: set or not, it lies 2 apart.

    A flag's standard deviation, sqrt(p (1 - p)) times the distance between its values, shrinks with the
    rarer value's share p: set in 1 row of 200, a flag stands 14 standard deviations out. Where a rare flag is
    an event (one flag among measurements, set in 7 rows of 2,114, 6 of them anomalies: 7_Cardiotocography),
    z-scores keep that signal. In a table of flags, where rows carry rare ones as a matter of course
    (17_InternetAds: 1,555 flags, most set in under 1% of its 1,121 training rows, a handful of rows each),
    those a model cannot learn would rule its training loss and its errors through whichever of them a row
    happens to carry (docs/evaluation.md, fourteenth round). One-hot categorical slots are 0/1 as they are,
    never z-scored: the same footing."""
    scale = np.maximum(std_scale(m), np.where(rare_flags(m), (m.hi - m.lo) / 2, 0.0))
    return m.mean.astype(np.float32), scale.astype(np.float32)


def std_scale(m: ColumnMoments) -> np.ndarray:
    """Each input's standard deviation, or 1 where it is constant (to rounding of its mean)."""
    return np.where(m.std > 1e-6 * np.maximum(1.0, np.abs(m.mean)), m.std, 1.0)


def rarer_share(m: ColumnMoments) -> np.ndarray:
    """Per input, the share of rows holding the rarer of its two values (0 where it is not two-valued)."""
    two = m.two_valued
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(two, (m.mean - m.lo) / np.where(two, m.hi - m.lo, 1.0), 0.0)
    return np.minimum(p, 1 - p)


def rare_flags(m: ColumnMoments) -> np.ndarray:
    """The inputs normalization_stats scales by half their range: in a table of flags (rows carry, on average,
    at least FLAG_TABLE_RARER_VALUES rarer values of two-valued inputs), the two-valued inputs whose rarer
    value is in fewer than RARE_FLAG_SHARE of rows. None elsewhere."""
    share = rarer_share(m)
    if float(share.sum()) < FLAG_TABLE_RARER_VALUES:
        return np.zeros(len(share), bool)
    return m.two_valued & (share < RARE_FLAG_SHARE)


@dataclass
class TableStats:
    """The prepare pass's statistics of the training rows' feature inputs, mergeable across blocks."""

    numeric: ColumnMoments
    nulls: np.ndarray
    """Missing values (null or NaN) per numeric input."""
    levels: list[LevelCounts]
    """Per categorical column."""

    @classmethod
    def empty(cls, n_numeric: int, n_categorical: int) -> "TableStats":
        return cls(ColumnMoments.empty(n_numeric), np.zeros(n_numeric, np.int64),
                   [LevelCounts() for _ in range(n_categorical)])

    def merge(self, other: "TableStats", capacity: int) -> "TableStats":
        return TableStats(self.numeric.merge(other.numeric), self.nulls + other.nulls,
                          [a.merge(b, capacity) for a, b in zip(self.levels, other.levels)])

    def to_json(self) -> str:
        return json.dumps({"n": self.numeric.n.tolist(), "mean": self.numeric.mean.tolist(),
                           "m2": self.numeric.m2.tolist(), "lo": self.numeric.lo.tolist(),
                           "hi": self.numeric.hi.tolist(), "nulls": self.nulls.tolist(),
                           "levels": [dataclasses.asdict(lc) for lc in self.levels]})

    @classmethod
    def from_json(cls, text: str) -> "TableStats":
        d = json.loads(text)
        return cls(ColumnMoments(np.asarray(d["n"], np.int64), np.asarray(d["mean"], np.float64),
                                 np.asarray(d["m2"], np.float64), np.asarray(d["lo"], np.float64),
                                 np.asarray(d["hi"], np.float64)), np.asarray(d["nulls"], np.int64),
                   [LevelCounts(**lc) for lc in d["levels"]])
