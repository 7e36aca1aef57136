"""The denoising model: trained to reconstruct x from a corrupted copy (its settings: pipeline/kinds/denoising.py)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.kinds.denoising import DenoisingSettings
from pipeline.models.base import Autoencoder


class DenoisingAutoencoder(Autoencoder):
    """Trains on `corrupt(x)` against the clean x; scores the clean input like the dense model."""

    settings: DenoisingSettings

    def __init__(self, n_features: int, settings: DenoisingSettings = DenoisingSettings(), **mlp: Any):
        super().__init__(n_features, settings=settings, **mlp)

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        level = self.settings.noise_level
        if self.settings.noise == "gaussian":
            return x + level * torch.randn_like(x)
        return x * (torch.rand_like(x) >= level).to(x.dtype)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        recon = self(self.corrupt(x))
        mse = self.recon_loss(recon, x)
        return mse, {"recon": mse.detach()}
