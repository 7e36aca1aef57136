"""`kind: sparse`: a penalty that keeps most code units near zero, so the code may be overcomplete."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec
from pipeline.models import Autoencoder


@dataclass(frozen=True)
class SparseSettings:
    sparsity: Literal["l1", "kl"] = "l1"
    """sparse: penalty on the code; l1 on |h|, or KL from sparsity_target to each unit's mean activation."""
    sparsity_weight: float = 1e-3
    """sparse: weight of the sparsity penalty in the loss."""
    sparsity_target: float = 0.05
    """sparse (kl): target mean activation of each code unit, in (0, 1)."""

    def __post_init__(self) -> None:
        check_config(self.sparsity_weight >= 0, "model.sparsity_weight", f"{self.sparsity_weight} must be >= 0")
        check_config(0.0 < self.sparsity_target < 1.0, "model.sparsity_target",
                     f"{self.sparsity_target} must be in (0, 1)")


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


def check(m: Any) -> None:
    if m.sparsity == "kl":
        check_config(m.code_activation in (None, "sigmoid"), "model.code_activation",
                     f"{m.code_activation}: the kl sparsity penalty needs codes in (0, 1); use sigmoid or unset")


SPEC = KindSpec("sparse", SparseAutoencoder, SparseSettings, check=check)
