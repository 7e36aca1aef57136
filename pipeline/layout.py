"""`SlotLayout`: which input slots make which input column, for inputs with categorical columns or missing
indicators. pipeline/featurizer.py builds it from the data; the models read it (pipeline/models/base.py).

A plain dataclass, importable without torch (the features and the config load without it); only `errors`,
which the models call on tensors, uses torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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

    def errors(self, recon: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, cols: torch.Tensor,
               group_cols: torch.Tensor) -> torch.Tensor:
        """(rows, n_columns) per-column errors; the index tensors come from the model's buffers."""
        import torch
        import torch.nn.functional as F

        out = recon.new_zeros(recon.shape[0], self.n_columns)
        if len(self.numeric):
            out = out.index_add(1, cols, (recon[:, slots] - x[:, slots]) ** 2)
        if self.groups:
            ce = [F.cross_entropy(recon[:, a:b], x[:, a:b].argmax(dim=1), reduction="none") for a, b, _ in self.groups]
            out = out.index_add(1, group_cols, torch.stack(ce, dim=1))
        return out
