"""Tensor input for the training workers: Arrow batches as normalized tensors, and the in-memory epoch cache.

    tensor_batches(tables, normalizer, device)   Arrow batches -> normalized tensors on the device
    EpochCache                                   a worker's shard kept in memory, reshuffled every epoch
    DirectSplits, direct_epochs                  cached epochs read by each worker itself, without Ray Data

Plain PyTorch and pyarrow: no Ray here (the Ray Data shards are opened in pipeline/train/worker.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline.rows import SplitFeatures, with_row_keys
from pipeline.shards import PATH_COLUMN
from pipeline.tensors import Normalizer, arrow_to_tensor
from pipeline.train.collective import all_reduce
from pipeline.watchdog import beat


def tensor_batches(tables: Iterable[pa.Table], normalizer: Normalizer, device: torch.device,
                   column: str = "x") -> Iterator[torch.Tensor]:
    non_blocking = device.type == "cuda"
    for t in tables:
        beat()  # progress for the driver's stall watch (pipeline/watchdog.py)
        if t.num_rows == 0:
            continue
        x = arrow_to_tensor(t, column)
        if non_blocking:
            x = x.pin_memory()
        yield normalizer(x.to(device, non_blocking=non_blocking))


class EpochCache:
    """A worker's shard of a split, kept in the worker's memory: given up front (`rows`, read by
    `DirectSplits`), or read from Ray Data once.

    Given a stream, the first pass streams (`stream()`: the normalized batches) and keeps every batch; each
    later pass draws a fresh permutation of all the kept rows and batches it: a full row-level shuffle of the
    shard every epoch (streaming shuffles only the block order, plus an optional local buffer), and no dataset
    execution, split coordinator round trip or re-read per epoch. Only a pass that ran to its end is kept.
    On a GPU the rows are kept in host memory and each batch is copied over as it is used.
    """

    def __init__(self, stream: Optional[Callable[[], Iterable[torch.Tensor]]], batch_size: int,
                 device: torch.device, shuffle: bool, seed: int, rows: Optional[torch.Tensor] = None,
                 limit: Optional[int] = None):
        self.stream, self.batch_size, self.device, self.shuffle = stream, batch_size, device, shuffle
        self.rows: Optional[torch.Tensor] = None
        self.limit = limit
        """Rows used per pass (the first `limit` of each permutation); None: all."""
        self.generator = torch.Generator().manual_seed(seed)
        if rows is not None:
            self._keep(rows)

    def _keep(self, rows: torch.Tensor) -> None:
        self.rows = rows.pin_memory() if self.device.type == "cuda" else rows

    def __call__(self) -> Iterator[torch.Tensor]:
        return self._first_pass() if self.rows is None else self._from_memory(self.rows)

    def _first_pass(self) -> Iterator[torch.Tensor]:
        kept = []
        for x in self.stream():
            kept.append(x.to("cpu"))
            yield x
        if kept:
            self._keep(torch.cat(kept))

    def _from_memory(self, rows: torch.Tensor) -> Iterator[torch.Tensor]:
        n, non_blocking = rows.shape[0], self.device.type == "cuda"
        if self.limit is not None:
            n = min(n, self.limit)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            beat()
            x = rows[order[i:i + self.batch_size]] if order is not None else rows[i:i + self.batch_size]
            yield x.to(self.device, non_blocking=non_blocking)


@dataclass(frozen=True)
class DirectSplits:
    """Cached epochs' input without Ray Data: each training worker reads its share of the input's row groups
    itself, once, and splits them into training and validation rows as the Ray Data path does (SplitFeatures).

    Through Ray Data, a training run started a DatasetManager and a SplitCoordinator per split (each a
    process importing torch and Ray Data) and ran a dataset execution per split before the first step: 11 s of
    the 30 s the ADBench pendigits job (4,312 training rows, 20 epochs) spent in training on this 2-core machine.
    Used only when the splits fit the cache (`cache_splits`) and every column read is in the files.
    """

    files: list[str]
    columns: list[str]
    data: Any
    """The data section (DataSection), `features` resolved."""
    num_features: int
    featurizer: Optional[Any] = None
    """The fitted Featurizer of scalar columns; None for a vector column."""

    def read(self, storage, rank: int, world: int) -> tuple[list[pa.Table], list[pa.Table]]:
        """This rank's training and validation rows (one `x` table per row group read). Row groups go round
        robin over the ranks; with fewer row groups than ranks, every rank reads them all and keeps every
        world-th row, so no rank is left without rows."""
        groups = []
        for f in self.files:
            with storage.open_parquet(f) as pf:
                groups += [(f, g) for g in range(pf.num_row_groups)]
        few = len(groups) < world
        mine: dict[str, list[int]] = {}
        for f, g in (groups if few else groups[rank::world]):
            mine.setdefault(f, []).append(g)
        splits = {s: SplitFeatures(self.data, self.num_features, s, self.featurizer) for s in ("train", "validation")}
        out: dict[str, list[pa.Table]] = {s: [] for s in splits}
        for f, gs in mine.items():
            path = storage.resolve(f)[1]  # the shard's name for error messages, as Ray Data's include_paths gives it
            with storage.open_parquet(f) as pf:
                # without ids the split hashes each row's place in its file (rows.ROW_KEY): row groups' offsets
                starts = None if self.data.ids else np.cumsum(
                    [0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
                for g in gs:
                    beat()
                    t = pf.read_row_group(g, columns=self.columns)
                    if starts is not None:
                        t = with_row_keys(t, path, int(starts[g]))
                    if few:
                        t = t.take(np.arange(rank, t.num_rows, world))
                    t = t.append_column(PATH_COLUMN, pa.array([path] * t.num_rows, pa.string()))
                    for s, split in splits.items():
                        out[s].append(split(t))
        return out["train"], out["validation"]


def direct_epochs(direct: DirectSplits, storage: Any, normalizer: Normalizer, n_features: int, batch_size: int,
                  seed: int, rank: int, world: int, device: torch.device,
                  val_batch_size: int) -> tuple[EpochCache, EpochCache]:
    """(train_batches, val_batches) over this rank's rows read once (`direct`). Every rank trains on the
    same number of rows per epoch (the smallest share; each epoch's permutation picks which), since DDP's
    all-reduce in every step needs the same number of steps on every rank. `normalizer` is on the CPU: the
    cache keeps host rows and copies each batch to `device`."""
    cpu = torch.device("cpu")
    train, val = direct.read(storage, rank, world)

    def rows(tables: list[pa.Table]) -> torch.Tensor:
        parts = list(tensor_batches(tables, normalizer, cpu))
        return torch.cat(parts) if parts else torch.zeros((0, n_features))

    train_rows, val_rows = rows(train), rows(val)
    limit = int(all_reduce([train_rows.shape[0]], "MIN")[0])
    return (EpochCache(None, batch_size, device, shuffle=True, seed=seed + rank, rows=train_rows, limit=limit),
            EpochCache(None, val_batch_size, device, shuffle=False, seed=0, rows=val_rows))
