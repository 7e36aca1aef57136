"""`kind: denoising`: learns to map a corrupted x~ back to the clean x; scored on clean input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec
from pipeline.models import Autoencoder


@dataclass(frozen=True)
class DenoisingSettings:
    noise: Literal["gaussian", "mask"] = "gaussian"
    """denoising: corruption; gaussian adds noise_level * N(0,1), mask zeroes features with p = noise_level."""
    noise_level: float = 0.2
    """denoising: noise std in normalized units (gaussian) or share of features masked (mask, < 1)."""

    def __post_init__(self) -> None:
        check_config(self.noise_level > 0, "model.noise_level", f"{self.noise_level} must be > 0")
        if self.noise == "mask":
            check_config(self.noise_level < 1, "model.noise_level", f"{self.noise_level} must be < 1 for mask noise")


class DenoisingAutoencoder(Autoencoder):
    """Gaussian noise adds noise_level * N(0, 1) to each (normalized) feature; masking noise sets each feature
    to 0, its training mean, with probability noise_level.
    """

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


SPEC = KindSpec("denoising", DenoisingAutoencoder, DenoisingSettings)
