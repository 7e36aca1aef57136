"""An ensemble's plain (`kind: dense`) members run as one batched network: each layer of the M members is one
batched matmul (`torch.baddbmm`) over their stacked weights, so a training step is a few large ops instead of M
passes through M small modules. Imports only torch.

    stackable(members) -> bool            worth_stacking(rows, weights) -> bool
    stacked_recon_loss(members, x) -> the members' mean reconstruction loss

Why: on a small table a step's cost is per-op overhead, not arithmetic (the default model is five members of a
few thousand weights each), and running the members one after another multiplies it by five. Where the
arithmetic dominates, stacking costs more than it saves (it copies every weight each step, and pads the
narrower codes), so the ensemble stacks only steps of at most STACK_MAX_WORK multiply-adds (`worth_stacking`).

The weights stay the members' own parameters (the same state dict, checkpoints and optimizer): each step stacks
them, so gradients flow back to every member's tensors. Members whose layer widths differ (their code widths
do: pipeline/sizing.py's `auto_member_latents`) have that layer's weights padded with zeros to the widest. A
padded unit's input weights and bias are zero, so it holds act(0), and the next layer's weights from it are
zero, so it adds nothing to any real unit whatever act(0) is: the loss and every gradient are the sequential
members' up to float rounding (`tests/test_model_kinds.py` checks both).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


STACK_MAX_WORK = 1 << 25
"""A step is stacked when its rows times the members' weights (the forward pass's multiply-adds) is at most this
(about 33.5 million). `python -m benchmarks.ensemble_step` (the default five members, one CPU thread; figures in
docs/performance.md): stacking halves the step of a small table (8 to 30 columns at batches of 16 to 256), is
level around the cut (64 to 100 columns at 256 to 512 rows: 27 and 33 million) and slower above it (100 columns
at 512 rows, 67 million: 0.91 of the sequential speed; 1,555 columns at 16, 143 million: 0.58)."""


def worth_stacking(rows: int, weights: int) -> bool:
    """Whether a step of `rows` rows through members of `weights` weights in all is stacked (STACK_MAX_WORK)."""
    return rows * weights <= STACK_MAX_WORK


def member_weights(members: Sequence[nn.Module]) -> int:
    """The members' Linear weights in all (biases aside): a step's multiply-adds per row."""
    return sum(m.weight.numel() for member in members for m in member.modules() if isinstance(m, nn.Linear))


def stackable(members: Sequence[nn.Module]) -> bool:
    """Whether `members` (plain autoencoders: the dense kind, whose loss is the reconstruction alone; the caller
    checks the class) can run as one batched network: the same input, activations, layer count and column
    layout, and no dropout (its random masks would differ from the members' own)."""
    first = members[0]
    if len(members) < 2:
        return False
    if any(isinstance(mod, nn.Dropout) for m in members for mod in (*m.encoder, *m.decoder)):
        return False
    same = all((m.n_features, m.activation, m.code_activation, len(m.encoder), len(m.decoder)) ==
               (first.n_features, first.activation, first.code_activation, len(first.encoder), len(first.decoder))
               for m in members)
    return same and all(m.layout is first.layout for m in members)


def _batched_layer(layers: Sequence[nn.Linear], h: torch.Tensor) -> torch.Tensor:
    """(M, rows, width_in) -> (M, rows, widest out): every member's layer at once, narrower ones zero-padded;
    from (rows, width_in), the input all members share, one matmul over their weights side by side."""
    width_in, width_out = h.shape[-1], max(lin.out_features for lin in layers)

    def pad(t: torch.Tensor, *widths: int) -> torch.Tensor:  # zeros after the last dims (the last one first)
        return F.pad(t, [n for w in widths for n in (0, w)]) if any(widths) else t

    w = torch.stack([pad(lin.weight, width_in - lin.in_features, width_out - lin.out_features) for lin in layers])
    b = torch.stack([pad(lin.bias, width_out - lin.out_features) for lin in layers])
    if h.dim() == 2:
        out = torch.addmm(b.reshape(-1), h, w.reshape(-1, width_in).t())  # (rows, M * width_out)
        return out.reshape(h.shape[0], len(layers), width_out).transpose(0, 1)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _stacked_mlp(seqs: Sequence[nn.Sequential], h: torch.Tensor) -> torch.Tensor:
    """The members' MLPs (`models.base.mlp`, no dropout: Linear, activation, ..., Linear, one activation the
    members share, after every layer but the last), each layer batched."""
    act = seqs[0][1] if len(seqs[0]) > 1 else None
    layers = list(zip(*([mod for mod in seq if isinstance(mod, nn.Linear)] for seq in seqs)))
    for i, layer in enumerate(layers):
        h = _batched_layer(layer, h)
        if i < len(layers) - 1:
            h = act(h)
    return h


def stacked_forward(members: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """(M, rows, features): every member's reconstruction of `x`, from one batched pass."""
    codes = members[0].code_act(_stacked_mlp([m.encoder for m in members], x))
    return _stacked_mlp([m.decoder for m in members], codes)


def stacked_recon_loss(members: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The mean over members of each one's `recon_loss(member(x), x)`: every member sees the same rows and
    columns, so it is the mean over all of them."""
    recon = stacked_forward(members, x)
    m, rows, width = recon.shape
    return torch.mean(members[0].column_errors(recon.reshape(m * rows, width), x.repeat(m, 1)))
