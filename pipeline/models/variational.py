"""The variational model: Gaussian posterior and likelihood, loss -ELBO (the maths: pipeline/kinds/variational.py)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from pipeline.kinds.variational import VariationalSettings
from pipeline.layout import SlotLayout
from pipeline.models.base import Autoencoder, mlp


class VariationalAutoencoder(Autoencoder):
    settings: VariationalSettings
    LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0  # keeps exp() finite when a unit's posterior collapses or explodes

    def __init__(self, n_features: int, *, hidden_dims: Sequence[int], latent_dim: int, activation: str = "gelu",
                 dropout: float = 0.0, code_activation: Optional[str] = None, score: str = "recon",
                 settings: VariationalSettings = VariationalSettings(), layout: Optional[SlotLayout] = None):
        nn.Module.__init__(self)  # not Autoencoder's layers: two heads (mu, logvar) and a learned variance
        self.settings = settings
        self.n_features, self.latent_dim = n_features, latent_dim
        self._init_layout(layout)  # missing indicators only: its Gaussian likelihood has no categorical part
        self.activation, self.code_activation = activation, "linear"  # the code is a Gaussian mean
        body = [n_features, *hidden_dims]
        self.encoder = mlp(body, activation, dropout, last_activation=True) if hidden_dims else nn.Identity()
        self.mu = nn.Linear(body[-1], latent_dim)
        self.logvar = nn.Linear(body[-1], latent_dim)
        self.code_act = nn.Identity()
        self.decoder = mlp([latent_dim, *reversed(list(hidden_dims)), n_features], activation, dropout)
        self.out_logvar = nn.Parameter(torch.zeros(n_features))  # log s^2 per feature; data is unit-variance
        self._init_score(score)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.mu(z), self.logvar(z).clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def _nll(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """-log p(x|h) per row, Gaussian with the learned per-feature variance."""
        lv = self.out_logvar.clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)
        sq = (recon.float() - x.float()) ** 2
        return 0.5 * torch.sum(sq * torch.exp(-lv) + lv + math.log(2 * math.pi), dim=1)

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, exp(logvar)) || N(0, I)) per row."""
        mu, logvar = mu.float(), logvar.float()
        return 0.5 * torch.sum(mu * mu + torch.exp(logvar) - 1 - logvar, dim=1)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mu, logvar = self.posterior(x)
        h = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = self.decode(h)
        nll, kl = self._nll(x, recon).mean(), self.kl(mu, logvar).mean()
        mse = self.recon_loss(recon, x)
        return nll + self.settings.kl_weight * kl, {"recon": mse.detach(), "nll": nll.detach(), "kl": kl.detach()}

    def neg_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row negative ELBO with the likelihood at h = mu(x) (deterministic)."""
        mu, logvar = self.posterior(x)
        return self._nll(x, self.decode(mu)) + self.settings.kl_weight * self.kl(mu, logvar)

    def _eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.posterior(x)
        recon = self.decode(mu)
        if self.score_kind == "calibrated":
            self.calibration.observe(self.column_errors(recon, x), mu)
        # early stopping follows the training objective, whatever the score
        return (self._nll(x, recon) + self.settings.kl_weight * self.kl(mu, logvar)).sum()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_and_latent(x)[0]

    def _score_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(x)
        recon = self.decode(mu)
        sq = self.column_errors(recon, x)
        if self.score_kind == "elbo":
            s = self._nll(x, recon) + self.settings.kl_weight * self.kl(mu, logvar)
        else:
            s = self._row_score(sq, mu)
        return s, mu.float(), sq

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n draws of x from the model: h ~ N(0, I), x ~ p(x|h), in normalized space."""
        dev = self.out_logvar.device
        h = torch.randn(n, self.latent_dim, generator=generator, device=dev)
        mean = self.decode(h).float()
        sd = torch.exp(0.5 * self.out_logvar.clamp(self.LOGVAR_MIN, self.LOGVAR_MAX))
        return mean + sd * torch.randn(mean.shape, generator=generator, device=dev)
