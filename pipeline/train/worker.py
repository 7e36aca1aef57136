"""The Ray Train glue: what runs on every training worker (`train_loop_per_worker`) and its Ray pieces
(DDP through `prepare_model`, reports with checkpoints, the dataset shards, the nodes the ranks run on).
Everything else the worker does is plain PyTorch in the modules beside this one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch

from pipeline.tensors import Normalizer
from pipeline.train.collective import all_gather_objects
from pipeline.train.batches import EpochCache, direct_epochs, tensor_batches
from pipeline.train.loop import run_training
from pipeline.train.state import CHECKPOINT_FILE, WorkerConfig, build_trainee, resume_state
from pipeline.train.validate import finish_validation

WORKER_CONFIG = "worker"
"""The one key of Ray's train_loop_config: the WorkerConfig."""


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (the history records where training ran)."""
    import ray

    return all_gather_objects(ray.get_runtime_context().get_node_id())


def _prepare_ddp(module: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
    import ray.train.torch

    kw = {"find_unused_parameters": True} if find_unused_parameters else None
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kw)


def _ray_report(metrics: dict[str, Any], payload: Optional[dict[str, Any]]) -> None:
    import ray.train

    if payload is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(payload, os.path.join(d, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def load_payload(ckpt) -> Optional[dict[str, Any]]:
    """The payload of a Ray checkpoint (TrainState.checkpoint's dict), or None without one."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict[str, WorkerConfig]) -> None:
    """Runs on every Ray Train worker: seeds, restores, builds the model, feeds run_training its shards."""
    import ray.train
    import ray.train.torch

    wc = config[WORKER_CONFIG]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(wc.torch_threads)
    torch.manual_seed(wc.seed + rank)
    device = ray.train.torch.get_device()
    saved, source = resume_state(load_payload(ray.train.get_checkpoint()), wc.storage, wc.checkpoints_uri, rank)
    trainee, state = build_trainee(wc, device, _prepare_ddp, saved)
    if saved is not None and rank == 0:
        where = "" if source == "registered" else f" (newest in storage, not yet registered by Ray Train: {source})"
        print(f"[train] resumed from checkpoint after epoch {state.start_epoch - 1}{where}", flush=True)
    if wc.direct is not None:
        world = ray.train.get_context().get_world_size()
        train_batches, val_batches = direct_epochs(wc.direct, wc.storage, Normalizer(wc.mean, wc.scale, "cpu"),
                                                   wc.n_features, wc.batch_size, wc.seed, rank, world, device,
                                                   wc.train.validation_batch_size)
    else:
        train_batches, val_batches = dataset_epochs(wc, rank, device)
    if saved is not None and source != "registered" and state.finished(wc.epochs):
        # a finished run Ray Train has not seen the end of: report its last checkpoint as the result
        if state.validation is None:  # a checkpoint without the sketch of its best model
            finish_validation(wc, state, val_batches, device, rank)
        _ray_report(state.history[-1], state.checkpoint(trainee, state.start_epoch - 1) if rank == 0 else None)
    run_training(wc, trainee, state, train_batches, val_batches,
                 device, rank, _ray_report, extra_metrics={"worker_nodes": _worker_nodes()})


def dataset_epochs(wc: WorkerConfig, rank: int, device: torch.device):
    """(train_batches, val_batches) over this rank's Ray Data shards: streamed each epoch, or read once
    (EpochCache) when `wc.cache`."""
    import ray.train

    normalizer = Normalizer(wc.mean, wc.scale, device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    iter_kw = dict(batch_size=wc.batch_size, batch_format="pyarrow", prefetch_batches=2)
    if wc.train.shuffle_buffer_rows:
        iter_kw["local_shuffle_buffer_size"] = wc.train.shuffle_buffer_rows
    val_kw = dict(batch_size=wc.train.validation_batch_size, batch_format="pyarrow", prefetch_batches=2)
    train_batches = lambda: tensor_batches(train_shard.iter_batches(**iter_kw), normalizer, device)  # noqa: E731
    val_batches = lambda: tensor_batches(val_shard.iter_batches(**val_kw), normalizer, device)  # noqa: E731
    if wc.cache:
        train_batches = EpochCache(train_batches, wc.batch_size, device, shuffle=True, seed=wc.seed + rank)
        val_batches = EpochCache(val_batches, wc.train.validation_batch_size, device, shuffle=False, seed=0)
    return train_batches, val_batches
