"""Training: pure step functions (tested without Ray), the per-worker loop, and the driver that runs it.

Driver (`fit`): builds the train/validation datasets, `ScalingConfig`, `RunConfig(name, storage_path)` and
a `TorchTrainer`; the run's checkpoints live in artifact storage, so rerunning the same `run.name` resumes.
Worker (`train_loop_per_worker`): takes its shards, prepares the model, and per epoch trains, evaluates,
all-reduces the losses, and reports metrics with a checkpoint holding the latest and the best weights.
Early stopping is decided from all-reduced validation loss, so every rank stops at the same epoch.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline.models import Autoencoder, build_model

CHECKPOINT_FILE = "state.pt"

# Arrow buffers are read-only; the tensors made from them are never written to, so the copy torch asks
# for is skipped (zero-copy is the point) and its warning silenced.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


# ------------------------------------------------------------------------------------------ pure steps


class Normalizer:
    """(x - mean) / scale with the stored statistics, on whatever device the model is on."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, device: torch.device | str = "cpu"):
        self.mean = torch.as_tensor(np.asarray(mean, np.float32), device=device)
        self.inv_scale = 1.0 / torch.as_tensor(np.asarray(scale, np.float32), device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_scale


def arrow_to_tensor(table: pa.Table, column: str = "x") -> torch.Tensor:
    """The fixed_size_list<float32> column of an Arrow batch as a (rows, d) tensor, without copying."""
    arr = table.column(column)
    arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    d = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.reshape(-1, d))


def tensor_batches(tables: Iterable[pa.Table], normalizer: Normalizer, device: torch.device,
                   column: str = "x") -> Iterator[torch.Tensor]:
    non_blocking = device.type == "cuda"
    for t in tables:
        if t.num_rows == 0:
            continue
        x = arrow_to_tensor(t, column)
        if non_blocking:
            x = x.pin_memory()
        yield normalizer(x.to(device, non_blocking=non_blocking))


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    rows: int = 0
    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    first_batch_rows: int = 0
    data_wait_seconds: float = 0.0
    """Time spent waiting for the next batch after the first: where the GPU/CPU sat idle for want of data."""
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.rows, 1)

    @property
    def steady_rows(self) -> int:
        """Rows after the first batch (whose time includes warm-up and the pipeline filling up)."""
        return self.rows - self.first_batch_rows

    @property
    def steady_seconds(self) -> float:
        return self.seconds - self.first_batch_seconds


def autocast_for(device: torch.device):
    """bf16 autocast on GPU (mixed precision); a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class LossForward(torch.nn.Module):
    """Makes the autoencoder's loss() the forward pass, so DDP's gradient all-reduce covers it."""

    def __init__(self, ae: Autoencoder):
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor):
        return self.ae.loss(x)


def unwrap(model: torch.nn.Module) -> Autoencoder:
    """The autoencoder inside DDP and/or LossForward wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "ae", model)


def train_epoch(batches: Iterable[torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device | None = None, step_fn: Optional[Callable] = None) -> EpochStats:
    """One pass of minibatch gradient descent. Returns the row-weighted mean loss and timings.

    `model` is an Autoencoder, or a (DDP-wrapped) LossForward; `step_fn(x) -> (loss, parts)` replaces the
    gradient step for learning rules without a backward pass.
    """
    device = device or torch.device("cpu")
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    # Sums stay on the device until the epoch ends: a float() per step would make the CPU wait for the GPU
    # to finish each step before it could queue the next one.
    loss_sum: Any = 0.0
    parts_sum: dict[str, Any] = {}
    step_done = start
    for i, x in enumerate(batches):
        if i:  # the first batch's wait is warm-up, reported apart
            stats.data_wait_seconds += time.perf_counter() - step_done
        if step_fn is not None:
            loss, parts = step_fn(x)
        else:
            with autocast_for(device):
                loss, parts = model.loss(x) if isinstance(model, Autoencoder) else model(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        n = x.shape[0]
        loss_sum = loss_sum + _weighted(loss, n)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + _weighted(v, n)
        stats.rows += n
        if i == 0:
            stats.first_batch_seconds, stats.first_batch_rows = time.perf_counter() - start, n
        step_done = time.perf_counter()
    stats.loss_sum = float(loss_sum)
    stats.parts = {k: float(v) / max(stats.rows, 1) for k, v in parts_sum.items()}
    stats.seconds = time.perf_counter() - start
    return stats


def _weighted(v: Any, n: int) -> Any:
    """`v * n` as a float64 device tensor (no host sync) for tensors, as a float for plain numbers."""
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64) * n
    return float(v) * n


@torch.inference_mode()
def evaluate(batches: Iterable[torch.Tensor], model: torch.nn.Module) -> tuple[float, int]:
    """(sum of per-row validation scores, rows)."""
    core = unwrap(model)
    core.eval()
    total, rows = 0.0, 0
    for x in batches:
        total = total + _weighted(core.eval_loss(x), 1)  # on the device: no host sync per batch
        rows += x.shape[0]
    return float(total), rows


def effective_batch_size(requested: int, rows_per_worker: int, min_steps: int = 20, floor: int = 16) -> int:
    """The configured batch size, lowered on small data so each worker still takes `min_steps` steps."""
    if rows_per_worker <= 0:
        return requested
    return int(max(min(floor, requested), min(requested, rows_per_worker // min_steps)))


@dataclass
class EarlyStopping:
    patience: int
    min_delta: float
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record this epoch's validation loss; True when it is the new best."""
        if not math.isfinite(value):
            self.bad_epochs += 1
            return False
        if value < self.best - self.min_delta * abs(self.best if math.isfinite(self.best) else value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


# ------------------------------------------------------------------------------------------ worker loop


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    core = unwrap(model)
    return {k: v.detach().to("cpu").clone() for k, v in core.state_dict().items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. `config` holds plain values only (model settings, stats, knobs)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["torch_threads"])
    torch.manual_seed(config["seed"] + rank)

    device = ray.train.torch.get_device()
    model = build_model(config["n_features"], **config["model"])
    algorithm = config.get("algorithm", "backprop")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])

    start_epoch, history = 0, []
    stopper = EarlyStopping(config["patience"], config["min_delta"])
    best_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_state = state["best_model"]
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        stopper = EarlyStopping(config["patience"], config["min_delta"], best=float(state["best_val"]),
                                best_epoch=int(state["best_epoch"]), bad_epochs=int(state["bad_epochs"]))
        if rank == 0:
            print(f"[train] resumed from checkpoint after epoch {start_epoch - 1}", flush=True)

    ae = model
    if algorithm == "backprop":
        # a stacked model's pretraining stage trains one layer pair: DDP must expect unused parameters
        ddp_kw = {"find_unused_parameters": True} if config["model"].get("kind") == "stacked" else None
        model = ray.train.torch.prepare_model(LossForward(ae), parallel_strategy_kwargs=ddp_kw)
    else:
        model = ae.to(device)
    step_fn = None
    if algorithm != "backprop":
        from pipeline.recirculation import make_step_fn  # noqa: PLC0415 - only this path needs it

        step_fn = make_step_fn(model, config)
    normalizer = Normalizer(config["mean"], config["scale"], device)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    iter_kw = dict(batch_size=config["batch_size"], batch_format="pyarrow", prefetch_batches=2)
    if config["shuffle_buffer_rows"]:
        iter_kw["local_shuffle_buffer_size"] = config["shuffle_buffer_rows"]
    epochs = config["epochs"]
    run_start = time.perf_counter()

    if stopper.should_stop or start_epoch >= epochs:
        epochs = start_epoch  # a finished run resumed: nothing left to do but report the final checkpoint
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        stage = ae.begin_epoch(epoch)  # None, or e.g. "pretrain-1/3" / "finetune" for a stacked model
        stats = train_epoch(tensor_batches(train_shard.iter_batches(**iter_kw), normalizer, device),
                            model, optimizer, device, step_fn=step_fn)
        val_sum, val_rows = evaluate(
            tensor_batches(val_shard.iter_batches(batch_size=config["batch_size"] * 4, batch_format="pyarrow",
                                                  prefetch_batches=2), normalizer, device), model)
        tr_sum, tr_rows, v_sum, v_rows, steady_rows, steady_secs, wait_secs = _all_reduce_sum(
            [stats.loss_sum, stats.rows, val_sum, val_rows, stats.steady_rows, stats.steady_seconds,
             stats.data_wait_seconds])
        train_loss = tr_sum / max(tr_rows, 1)
        val_loss = v_sum / max(v_rows, 1) if v_rows else train_loss
        pretraining = stage is not None and stage != "finetune"
        # the full model is not what pretraining optimizes: early stopping and the best model wait for fine-tuning
        improved = False if pretraining else stopper.update(val_loss, epoch)
        if improved or best_state is None:
            best_state = _state_to_cpu(model)
        elapsed = time.perf_counter() - t0
        metrics = {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_val_loss": stopper.best,
            "best_epoch": stopper.best_epoch, "train_rows": int(tr_rows), "val_rows": int(v_rows),
            "rows_per_s": tr_rows / max(elapsed, 1e-9), "epoch_seconds": elapsed,
            "first_batch_seconds": stats.first_batch_seconds,
            # steady state per worker: training steps only, the first batch (warm-up) excluded
            "worker_rows_per_s": steady_rows / steady_secs if steady_secs > 0 else 0.0,
            "data_wait_fraction": wait_secs / steady_secs if steady_secs > 0 else 0.0,
            **{f"train_{k}": v for k, v in stats.parts.items() if k != "recon"},
            **({"stage": stage} if stage is not None else {}),
        }
        history.append(metrics)
        stop = stopper.should_stop
        if rank == 0:
            done = epoch + 1 - start_epoch
            left = (epochs - epoch - 1) if not stop else 0
            eta = (time.perf_counter() - run_start) / done * left
            print(f"[train] epoch {epoch + 1}/{epochs} train_loss={train_loss:.5f} val_loss={val_loss:.5f}"
                  f" best={stopper.best:.5f}@{stopper.best_epoch + 1} rows={int(tr_rows)}"
                  f" {metrics['rows_per_s']:,.0f} rows/s epoch={elapsed:.1f}s eta={eta:.0f}s"
                  + (f" stage={stage}" if stage is not None else "")
                  + ("  (early stop)" if stop else ""), flush=True)
        _report(metrics, rank, model, optimizer, best_state, stopper, epoch, history)
        if stop:
            break


def _report(metrics, rank, model, optimizer, best_state, stopper, epoch, history) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({
            "model": _state_to_cpu(model), "optimizer": optimizer.state_dict(), "best_model": best_state,
            "epoch": epoch, "best_val": stopper.best, "best_epoch": stopper.best_epoch,
            "bad_epochs": stopper.bad_epochs, "history": history,
        }, os.path.join(d, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ------------------------------------------------------------------------------------------ driver


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    batch_size: int
    epochs: int
    """The epoch limit the run had (train.epochs, or with `auto` what train.steps needed)."""


def fit(cfg, storage, spec, mean: np.ndarray, scale: np.ndarray, n_train: int) -> FitResult:
    """Run the TorchTrainer over the train/validation splits; checkpoints go to `<run>/train/`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.config import join_uri
    from pipeline.data import SplitFeatures, read_dataset

    data, tr = cfg.data, cfg.train
    train_ds = read_dataset(spec, storage).map_batches(
        SplitFeatures(data, spec.num_features, "train"), batch_format="pyarrow", batch_size=None)
    val_ds = read_dataset(spec, storage).map_batches(
        SplitFeatures(data, spec.num_features, "validation"), batch_format="pyarrow", batch_size=None)
    train_ds = train_ds.randomize_block_order(seed=None)

    from pipeline.sizing import step_budget

    batch_size, epochs = step_budget(tr.batch_size, n_train // tr.num_workers, tr.epochs, tr.steps)
    if batch_size != tr.batch_size or tr.epochs == "auto":
        print(f"[train] batch size {batch_size}, up to {epochs} epochs (train.epochs {tr.epochs}, train.steps "
              f"{tr.steps}; {n_train} training rows, {tr.num_workers} workers)", flush=True)
    loop_config = {
        "n_features": spec.num_features, "model": _model_settings(cfg), "algorithm": tr.algorithm,
        "lr": tr.lr, "weight_decay": tr.weight_decay, "epochs": epochs, "batch_size": batch_size,
        "patience": tr.patience, "min_delta": tr.min_delta, "seed": cfg.run.seed,
        "shuffle_buffer_rows": tr.shuffle_buffer_rows, "mean": mean.tolist(), "scale": scale.tolist(),
        "recirculation_lambda": tr.recirculation_lambda,
        "torch_threads": max(1, int(tr.cpus_per_worker)),
    }
    resources = {"CPU": tr.cpus_per_worker}
    if tr.use_gpu:
        resources["GPU"] = 1
    train_uri = join_uri(cfg.run_uri, "train")
    fs, train_path = storage.resolve(train_uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=train_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=tr.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds, "validation": val_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.run.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    return FitResult(best_state=state["best_model"], history=list(state["history"]),
                     best_epoch=int(state["best_epoch"]), best_val_loss=float(state["best_val"]),
                     batch_size=batch_size, epochs=epochs)


def _model_settings(cfg) -> dict[str, Any]:
    """The model section as build_model's keyword arguments."""
    import dataclasses

    return dataclasses.asdict(cfg.model)
