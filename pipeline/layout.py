"""`SlotLayout`: which input slots make which input column, for inputs with categorical columns or missing
indicators. pipeline/featurizer.py builds it from the data; the models read it (pipeline/models/base.py).

A plain dataclass, importable without torch (the features and the config load without it); only `errors`,
which the models call on tensors, uses torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SlotLayout:
    """A numeric-only input has none and each slot is its own column.

    A column's error: a numeric column's squared error (plus its missing indicator's), a categorical column's
    cross-entropy of its softmax over its slots (levels, other, missing) against the observed level. So a
    column counts once, however many levels it has."""

    n_columns: int
    numeric: tuple[tuple[int, int], ...]
    """(slot, column) of every numeric value and missing-indicator slot."""
    groups: tuple[tuple[int, int, int], ...]
    """(first slot, end slot, column) of every categorical column's one-hot block."""

    def buckets(self) -> tuple[tuple[Union[tuple[int, int, int], tuple[tuple[int, ...], ...]], tuple[int, ...]], ...]:
        """The categorical columns grouped by their number of slots: per width, where its columns' slots lie and
        the columns. Where lies as (first slot, columns, width) when those slots are one run (a single column's
        always are), else as the index matrix, a row of slots per column. One gather (a view, for a run) and
        one log-softmax per width then serve every column of that width: a table of 1,545 boolean columns is
        one bucket, not 1,545 cross-entropy calls."""
        by_width: dict[int, list[tuple[int, int, int]]] = {}
        for a, b, col in self.groups:
            by_width.setdefault(b - a, []).append((a, b, col))
        out = []
        for w, g in sorted(by_width.items()):
            first = g[0][0]
            run = all(a == first + i * w for i, (a, _, _) in enumerate(g))
            where = (first, len(g), w) if run else tuple(tuple(range(a, b)) for a, b, _ in g)
            out.append((where, tuple(col for _, _, col in g)))
        return tuple(out)

    def errors(self, recon: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, cols: torch.Tensor,
               buckets: list[tuple[Union[torch.Tensor, tuple[int, int, int]], torch.Tensor]]) -> torch.Tensor:
        """(rows, n_columns) per-column errors; the index tensors come from the model's buffers (`buckets`:
        `buckets()` with each index matrix and column list as a tensor)."""
        out = recon.new_zeros(recon.shape[0], self.n_columns)
        if len(self.numeric):
            out = out.index_add(1, cols, (recon[:, slots] - x[:, slots]) ** 2)
        for idx, group_cols in buckets:
            if isinstance(idx, tuple):  # one run of slots: a view, no copy
                a, n, w = idx
                logits, onehot = recon[:, a:a + n * w].unflatten(1, (n, w)), x[:, a:a + n * w].unflatten(1, (n, w))
            else:
                logits, onehot = recon[:, idx], x[:, idx]  # (rows, columns, width)
            observed = onehot.argmax(dim=2, keepdim=True)  # the observed level's slot, as one-hot's argmax
            ce = logits.logsumexp(dim=2) - logits.gather(2, observed).squeeze(2)  # cross-entropy per column
            out = out.index_add(1, group_cols, ce)
        return out
