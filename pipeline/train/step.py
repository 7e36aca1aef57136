"""The pure training step, plain PyTorch (no Ray, no process group needed): the optimizer, one epoch of
minibatch steps, the validation pass, the trimmed (robust) loss, and early stopping.

    make_optimizer(params, lr, weight_decay)   train_epoch(batches, model, optimizer) -> EpochStats
    evaluate(batches, model) -> (sum, rows)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from pipeline.models import Autoencoder, Ensemble
from pipeline.tensors import autocast_for


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    rows: int = 0
    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    first_batch_rows: int = 0
    data_wait_seconds: float = 0.0
    """Time spent waiting for the next batch after the first: where the GPU/CPU sat idle for want of data."""
    step_seconds: float = 0.0
    """Time in the training steps themselves (forward, backward, optimizer), every batch's wait excluded."""
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


FUSED_DEVICES = ("cpu", "cuda")
"""Devices with a fused AdamW kernel in torch that the pipeline trains on."""


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel per step for all the parameters) where their device has the kernel.

    The update is AdamW's; the per-tensor form it replaces spends most of a small model's step in Python (on
    CPU, 8% to 45% of the steps' time, most on small tables: docs/performance.md). Make it once the model is
    on its device (build_trainee does): whether to fuse is read from the parameters' device, and a checkpoint's
    state loaded into it goes to that device.
    """
    params = list(params)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def trimmed_rows(ae: Autoencoder, x: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """The rows of `x` without the `trim_fraction` the model reconstructs worst (a trimmed loss).

    Ranked by the per-column reconstruction error (squared error; cross-entropy for a categorical column)
    in a gradient-free forward pass, so it works for every kind whatever its loss adds (penalties, KL): the
    kept rows then go through the kind's own loss.
    """
    n = x.shape[0]
    keep = n - int(trim_fraction * n)
    if trim_fraction <= 0 or keep >= n or keep < 1:
        return x
    with torch.no_grad():
        err = ae.row_errors(x)
    return x[torch.topk(err, keep, largest=False).indices]


class LossForward(torch.nn.Module):
    """Makes the autoencoder's loss() the forward pass, so DDP's gradient all-reduce covers it; with
    `trim_fraction`, the loss of the batch's best-reconstructed rows only (`trimmed_rows`)."""

    def __init__(self, ae: Autoencoder, trim_fraction: float = 0.0):
        super().__init__()
        self.ae = ae
        self.trim_fraction = trim_fraction
        # DDP broadcasts rank 0's buffers before every step; the subspace term's are fitted alike on every rank
        # (from all-reduced sums), and its minor components can be a few MB on a wide input
        self._ddp_params_and_buffers_to_ignore = [f"ae.{n}" for n, _ in ae.named_buffers() if n.startswith("subspace.")]

    def forward(self, x: torch.Tensor):
        return self.ae.loss(trimmed_rows(self.ae, x, self.trim_fraction))


def unwrap(model: torch.nn.Module) -> Autoencoder:
    """The autoencoder inside DDP and/or LossForward wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "ae", model)


def train_epoch(batches: Iterable[torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device | None = None, step_fn: Optional[Callable] = None) -> EpochStats:
    """One pass of minibatch gradient descent. Returns the row-weighted mean loss and timings.

    `model` is an Autoencoder or Ensemble, or a (DDP-wrapped) LossForward; `step_fn(x) -> (loss, parts)` replaces the
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
        step_start = time.perf_counter()
        if i:  # the first batch's wait is warm-up, reported apart
            stats.data_wait_seconds += step_start - step_done
        if step_fn is not None:
            loss, parts = step_fn(x)
        else:
            with autocast_for(device):
                loss, parts = model.loss(x) if isinstance(model, (Autoencoder, Ensemble)) else model(x)
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
        stats.step_seconds += step_done - step_start
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


def state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the autoencoder's weights (inside any wrappers) on the CPU, for a checkpoint."""
    core = unwrap(model)
    return {k: v.detach().to("cpu").clone() for k, v in core.state_dict().items()}
