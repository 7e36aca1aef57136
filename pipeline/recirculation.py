"""Training by recirculation (Hinton & McClelland, 1988, "Learning Representations by Recirculation").

`train.algorithm: recirculation` trains a one-hidden-layer autoencoder (`model.kind: dense`,
`model.hidden_dims: []`: visible x -> hidden code h -> visible) with no backward pass. Activity circulates
visible -> hidden -> visible -> hidden, and each weight changes by the product of its input unit's activity
and the difference of its output unit's activity between the two passes:

    y(0) = x                                              original visible state
    y(1) = f(W_e y(0) + b_e)                              hidden state (f: model.code_activation)
    y(2) = lambda y(0) + (1 - lambda) (W_d y(1) + b_d)    recirculated visible state (linear visible units)
    y(3) = f(W_e y(2) + b_e)                              recirculated hidden state

    W_d += eps * (y(0) - y(2)) y(1)^T      b_d += eps * (y(0) - y(2))      (decoder: hidden -> visible)
    W_e += eps * (y(1) - y(3)) y(2)^T      b_e += eps * (y(1) - y(3))      (encoder: visible -> hidden)

eps is `train.lr` and lambda the regression factor `train.recirculation_lambda`. Each update is the mean over
the minibatch's rows. y(0) - y(2) = (1 - lambda)(x - r) makes the decoder rule the delta rule for the
reconstruction r; the encoder rule moves the code of x towards the code of its reconstruction, which for
lambda near 1 approximates gradient descent on the reconstruction error when W_e is close to W_d^T
(the paper's argument). The reported loss is the mean squared error of r before the update.

Data-parallel: every worker computes the update of its own minibatch; the updates (weighted by rows) are
summed with one all-reduce and divided by the total rows, so all replicas apply the same update and the
result is that of a single worker with the combined minibatch (rank 0's initial weights are broadcast first,
as DDP does). Everything runs under torch.no_grad().
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from pipeline.models.base import Autoencoder, linear_layers


def _single_layers(model: Autoencoder) -> tuple[nn.Linear, nn.Linear]:
    enc, dec = linear_layers(model.encoder), linear_layers(model.decoder)
    if type(model) is not Autoencoder or len(enc) != 1 or len(dec) != 1:  # the plain (dense) kind only
        raise ValueError("recirculation trains a dense autoencoder with one hidden layer (model.hidden_dims: [])")
    return enc[0], dec[0]


@torch.no_grad()
def recirculation_update(model: Autoencoder, x: torch.Tensor, lam: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({param name: mean update per unit learning rate}, mean squared reconstruction error) for batch x."""
    enc, dec = _single_layers(model)
    y0 = x.float()
    y1 = model.code_act(enc(y0))
    r = dec(y1)
    y2 = lam * y0 + (1 - lam) * r
    y3 = model.code_act(enc(y2))
    n = y0.shape[0]
    dv, dh = y0 - y2, y1 - y3
    updates = {
        "decoder.weight": dv.T @ y1 / n, "decoder.bias": dv.mean(dim=0),
        "encoder.weight": dh.T @ y2 / n, "encoder.bias": dh.mean(dim=0),
    }
    return updates, torch.mean((r - y0) ** 2)


def _all_reduce_mean(updates: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Row-weighted mean of every worker's updates (one all-reduce); unchanged outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return updates
    names = list(updates)
    flat = torch.cat([updates[k].reshape(-1) * rows for k in names] + [torch.tensor([float(rows)], device=updates[names[0]].device)])
    dist.all_reduce(flat)
    total = flat[-1]
    out, i = {}, 0
    for k in names:
        size = updates[k].numel()
        out[k] = (flat[i:i + size] / total).reshape(updates[k].shape)
        i += size
    return out


def make_step_fn(model: Autoencoder, lr: float, lam: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
    """`step_fn(x) -> (loss, parts)` applying one recirculation update to `model` in place: step size `lr`
    (train.lr), regression factor `lam` (train.recirculation_lambda).

    Under torch.distributed, rank 0's weights are first copied to every rank (what DDP does for backprop):
    the replicas must start equal for the same averaged updates to keep them equal.
    """
    enc, dec = _single_layers(model)
    params = {"encoder.weight": enc.weight, "encoder.bias": enc.bias,
              "decoder.weight": dec.weight, "decoder.bias": dec.bias}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in params.values():
                dist.broadcast(p.data, src=0)
    lr, lam = float(lr), float(lam)

    @torch.no_grad()
    def step_fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        updates, mse = recirculation_update(model, x, lam)
        updates = _all_reduce_mean(updates, x.shape[0])
        for k, p in params.items():
            p.add_(updates[k].to(p.dtype), alpha=lr)
        return mse, {"recon": mse}

    return step_fn
