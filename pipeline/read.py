"""The Ray Data read of the input's Parquet shards: one streaming task per file, only the columns needed."""

from __future__ import annotations

import time
from typing import Optional

from pipeline.inputs import InputSpec
from pipeline.storage import Storage

BLOCK_BYTES = 8 * 2**20
"""Largest block a read (and the maps fused with it) makes. A task holds a few copies of its block at once
(Arrow, the feature matrix, the model's outputs) and a streamed epoch keeps STREAM_BUFFER_BLOCKS of them per
training worker in the object store, so this, not the shard size, bounds a task's memory. `make scale` (155 MB
shards, 50x the rows of the 1x run): peak 3,475 MB with 32 MB blocks, 3,176 with 16, 2,892 with 8 (with the
scoring write apart and one validation task per CPU); Ray Data's default is 128 MB."""

READ_AHEAD_BATCHES = 1
"""Batches of a file pyarrow decodes ahead of the one a read task is using. Ray's defaults (8 batches ahead,
and every column chunk of the file pre-buffered) let one task hold most of a shard at once, so a task's memory
grew with the shard, not the block: reading one 128 MB shard peaked 454 MB above the process's baseline, 237
MB with one batch ahead and no pre-buffering (a 13 MB shard: 83 MB either way). The file is read in 8 MB
pieces; on local disk a 155 MB shard read no slower for it (best of four: 0.38 s against 0.76 s)."""

STREAM_BUFFER_BLOCKS = 4
"""Blocks per training worker that a streamed epoch's dataset may hold in the object store ahead of the
workers (Ray Data's own limit: half the object store, whatever the consumer needs). 8 held 226 MB of object
store pages at `make scale`'s 50x (16 MB blocks); 4 of 8 MB blocks hold ~130 MB, and the streamed epoch ran
as fast (170,965 rows/s against 170,116)."""

SAMPLING_SETTLE_S = 2.0
"""Longest wait for read_parquet's sampling tasks to hand their CPUs back (it takes ~0.1 s; bounded so a
cluster whose CPUs other work takes meanwhile never holds the job up here)."""


def _free_cpus() -> float:
    import ray

    return float(ray.available_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0


def _wait_for_free_cpus(target: float, timeout_s: float = SAMPLING_SETTLE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while _free_cpus() < target and time.monotonic() < deadline:
        time.sleep(0.02)


def stream_execution_options(num_workers: int):
    """Ray Data's execution options for the datasets training streams each epoch: the current ones, their
    object store use capped at STREAM_BUFFER_BLOCKS blocks per training worker (Ray Train replaces a
    dataset's own options by these)."""
    import copy

    import ray.data

    opts = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    opts.resource_limits = opts.resource_limits.copy(
        object_store_memory=STREAM_BUFFER_BLOCKS * max(1, num_workers) * BLOCK_BYTES)
    return opts


def read_dataset(spec: InputSpec, storage: Storage, with_paths: bool = True, num_cpus: Optional[float] = None,
                 shuffle_files: bool = False, row_keys: bool = False):
    """A streaming Ray Dataset over the shards: one read task per file, only the needed columns.

    Ray 2.60's default Parquet reader (DataSourceV2: ListFiles -> ReadFiles) planned every file of the input
    into a single read task here, which produced the whole input as one block: no parallel reads, no
    streaming, memory growing with the input (`make bench`: 0.13 of pyarrow's rows/s, first batch only at
    the end). The V1 `ParquetDatasource` reads a file per task and splits blocks larger than
    `target_max_block_size`, so reads run in parallel and the data streams through the object store.
    `num_cpus`, when a following map asks for the same, lets Ray fuse the read into that map's tasks.
    `shuffle_files`: each execution (each streamed epoch) reads the files in a new order, without the
    all-to-all barrier of `randomize_block_order`, which waits for every block of the input and, on an
    input larger than the object store, spills most of it. `row_keys`: each row's place in its file as a
    `shards.ROW_KEY` column, where the input has no id columns (what the train/validation split hashes then).

    read_parquet samples two files in Ray tasks of 1 CPU each. On a small cluster their CPUs can still be
    taken (in the cluster's resource view) when the dataset starts a moment later, and Ray Data's start-up
    check then warns that the cluster "does not have any available CPUs" and "will hang" (2 tries in 12 on
    `make run`'s 2 CPUs): the dataset is returned once the CPUs free before the read are free again.
    """
    import pyarrow.dataset as pds
    import ray.data

    free = _free_cpus()
    fs = storage.filesystem(spec.files[0])
    paths = [storage.resolve(f)[1] for f in spec.files]
    ctx = ray.data.DataContext.get_current()
    prev, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read_parquet picks the datasource here
    # The dataset keeps a copy of the context it was made in: its blocks are at most BLOCK_BYTES.
    prev_block, ctx.target_max_block_size = ctx.target_max_block_size, BLOCK_BYTES
    try:
        # `columns=` is pushed down into the V1 reader (V2 would want select_columns instead).
        keys = row_keys and spec.data is not None and not spec.data.ids
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=with_paths, columns=spec.columns,
                                   include_row_hash=keys,
                                   override_num_blocks=len(paths), num_cpus=num_cpus,
                                   shuffle="files" if shuffle_files else None,
                                   # pyarrow's scan: one batch ahead, read in 8 MB pieces (READ_AHEAD_BATCHES)
                                   batch_readahead=READ_AHEAD_BATCHES,
                                   fragment_scan_options=pds.ParquetFragmentScanOptions(
                                       use_buffered_stream=True, buffer_size=8 * 2**20, pre_buffer=False))
    finally:
        ctx.use_datasource_v2, ctx.target_max_block_size = prev, prev_block
    _wait_for_free_cpus(free)
    return ds
