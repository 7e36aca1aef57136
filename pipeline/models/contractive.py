"""The contractive model: the encoder Jacobian's squared norm added to the loss, in closed form and batched
(its settings: pipeline/kinds/contractive.py)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.kinds.contractive import ContractiveSettings
from pipeline.models.base import Autoencoder, activation_and_slope, linear_layers


def encoder_jacobian_sq_norm(model: Autoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code h, per-row ||dh/dx||_F^2) for an MLP encoder, in closed form and batched (no per-row loop).

    h = s_L(W_L ... s_1(W_1 x)) has Jacobian J = D_L W_L ... D_1 W_1 with D_l = diag(s_l'(a_l)); the product
    is taken from the code side, so it costs rows * latent * width^2 rather than rows * features * width^2.
    Dropout is left out: the penalty is on the deterministic encoder that scoring uses.
    """
    layers = linear_layers(model.encoder)
    acts = [model.activation] * (len(layers) - 1) + [model.code_activation]
    z, slopes = x, []
    for lin, act in zip(layers, acts):
        z, slope = activation_and_slope(act, lin(z))
        slopes.append(slope)
    m = slopes[-1].unsqueeze(2) * layers[-1].weight.unsqueeze(0)  # (rows, latent, width of the layer below)
    for lin, slope in zip(reversed(layers[:-1]), reversed(slopes[:-1])):
        m = (m * slope.unsqueeze(1)) @ lin.weight
    return z, (m.float() ** 2).sum(dim=(1, 2))


class ContractiveAutoencoder(Autoencoder):
    settings: ContractiveSettings

    def __init__(self, n_features: int, settings: ContractiveSettings = ContractiveSettings(), **mlp: Any):
        super().__init__(n_features, settings=settings, **mlp)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, jac = encoder_jacobian_sq_norm(self, x)
        mse = self.recon_loss(self(x), x)
        pen = jac.mean()
        return mse + self.settings.contractive_weight * pen, {"recon": mse.detach(), "jacobian": pen.detach()}
