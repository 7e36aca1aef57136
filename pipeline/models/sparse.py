"""The sparse model: the code's l1 or KL penalty added to the loss (its settings: pipeline/kinds/sparse.py)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.kinds.sparse import SparseSettings
from pipeline.models.base import Autoencoder


class SparseAutoencoder(Autoencoder):
    """l1: weight * mean |h| over rows and units (code activation relu by default: units can be exactly 0).
    kl: weight * sum_j KL(rho || rho_j), rho_j the batch-mean activation of unit j in (0, 1) (sigmoid code).
    """

    settings: SparseSettings

    def __init__(self, n_features: int, settings: SparseSettings = SparseSettings(), **mlp: Any):
        super().__init__(n_features, settings=settings, **mlp)

    def default_code_activation(self) -> str:
        return "sigmoid" if self.settings.sparsity == "kl" else "relu"

    def penalty(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        if self.settings.sparsity == "l1":
            return h.abs().mean()
        rho = self.settings.sparsity_target
        rho_hat = h.mean(dim=0).clamp(1e-6, 1 - 1e-6)
        return torch.sum(rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat)))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.encode(x)
        mse = self.recon_loss(self.decode(h), x)
        pen = self.penalty(h)
        return mse + self.settings.sparsity_weight * pen, {"recon": mse.detach(), "sparsity": pen.detach(),
                                                           "code_mean": h.detach().float().abs().mean()}
