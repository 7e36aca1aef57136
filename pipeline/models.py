"""Autoencoders for tabular feature vectors. Imports only torch: runs and is tested without Ray.

Every model maps a normalized batch `x` (rows, features) through an encoder h = f(x) and a decoder
r = g(h), and exposes the same four methods, so training and scoring never branch on the kind:

    loss(x)   -> (scalar training objective, {name: float} parts for logging)
    score(x)  -> per-row anomaly score (mean squared reconstruction error by default)
    latent(x) -> the code written to the output (for a stochastic encoder, its mean)
    forward(x) -> reconstruction

`build_model(n_features, **model_section)` picks the class from `kind`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
}


def mlp(dims: Sequence[int], activation: str, dropout: float = 0.0, last_activation: bool = False) -> nn.Sequential:
    """Linear layers through `dims`, with the activation (and dropout) between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        is_last = i == len(dims) - 2
        if not is_last or last_activation:
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0 and not is_last:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """Undercomplete MLP autoencoder (`kind: dense`): the bottleneck is the only constraint."""

    kind = "dense"

    def __init__(self, n_features: int, hidden_dims: Sequence[int] = (64, 32), latent_dim: int = 8,
                 activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.n_features = n_features
        self.latent_dim = latent_dim
        enc_dims = [n_features, *hidden_dims, latent_dim]
        self.encoder = mlp(enc_dims, activation, dropout)
        self.decoder = mlp(enc_dims[::-1], activation, dropout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        recon = self(x)
        mse = torch.mean((recon.float() - x.float()) ** 2)
        return mse, {"recon": mse.detach()}

    def eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The validation objective (sum over rows, to be divided by the row count after all-reduce)."""
        return self.score(x).sum()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row mean squared reconstruction error in normalized space."""
        recon = self(x)
        return torch.mean((recon.float() - x.float()) ** 2, dim=1)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def score_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-row score, latent code, per-feature squared error) in one forward pass."""
        h = self.encode(x)
        recon = self.decode(h).float()
        sq = (recon - x.float()) ** 2
        return sq.mean(dim=1), h.float(), sq


MODEL_KINDS: dict[str, type[Autoencoder]] = {"dense": Autoencoder}


def build_model(n_features: int, kind: str = "dense", **settings: Any) -> Autoencoder:
    """The autoencoder named by `kind`, built from the model config section's settings."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind {kind!r} is not available (have: {', '.join(sorted(MODEL_KINDS))})")
    return MODEL_KINDS[kind](n_features, **settings)
