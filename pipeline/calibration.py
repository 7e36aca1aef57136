"""The `calibrated` anomaly score (`model.score: calibrated`, the default): reconstruction error and code
position, each on the scale of the validation rows, added.

    score(x) = mean_j  e_j(x)^2 / E_val[e_j^2]   +   CODE_WEIGHT * mean_k (h_k(x) - E_val[h_k])^2 / Var_val[h_k]
               + MSE_WEIGHT * mean_j e_j(x)^2 / E_val[mean_j e_j^2]

e_j is feature j's reconstruction error and h the code. Plain mean squared error lets the features the
model reconstructs worst dominate every row's score, and it misses rows that lie on the learned manifold but
far out along it (the model reconstructs them well). Dividing each feature's error by its validation mean
puts every feature on the same footing, and the second term (a diagonal Mahalanobis distance of the code)
catches the far-out rows. Measured in a probe of the same networks on ADBench tables (README, Evaluation):
mean test AUROC on cardio, pendigits, thyroid and vowels 0.800 with plain MSE, 0.877 with this score
(pendigits 0.79 -> 0.94); it loses where anomalies sit in sparse pockets inside the data (vowels 0.91 -> 0.72).

The third term is plain mean squared error over its validation mean (every term then averages 1 on the
validation rows). It gives back what the first two lose where anomalies sit in sparse pockets inside the
data and are simply reconstructed badly on the features that vary most: measured with 3 seeds on the eight
tables of `make eval` (benchmarks/rank_probe.py, ensembles of 3), vowels 0.795 -> 0.880 (PCA 0.907) at an
level mean over the eight tables (0.841 -> 0.844).

The statistics are gathered while the model is evaluated on the validation rows, which the training loop
does after every epoch (`eval_loss`); `begin_epoch` starts a fresh count. They live in buffers, so the best
epoch's checkpoint carries the statistics of its own weights, and scoring needs nothing else. Before any
validation row has been seen, the score is plain MSE plus the code's squared norm.
"""

from __future__ import annotations

import torch
from torch import nn

CODE_WEIGHT = 1.0
MSE_WEIGHT = 1.0
EPS = 1e-12
FLOOR = 1e-3  # of the mean over features (code units)


class ScoreCalibration(nn.Module):
    """Running validation statistics (float64 sums) and the score they define."""

    def __init__(self, n_features: int, latent_dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sq_sum", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("code_sum", torch.zeros(latent_dim, dtype=torch.float64))
        self.register_buffer("code_sq_sum", torch.zeros(latent_dim, dtype=torch.float64))

    def reset(self) -> None:
        for b in (self.count, self.sq_sum, self.code_sum, self.code_sq_sum):
            b.zero_()

    @torch.no_grad()
    def observe(self, sq: torch.Tensor, h: torch.Tensor) -> None:
        """Add a validation batch: per-feature squared errors (rows, d) and codes (rows, k)."""
        h = h.detach().to(torch.float64)
        self.count += sq.shape[0]
        self.sq_sum += sq.detach().to(torch.float64).sum(dim=0)
        self.code_sum += h.sum(dim=0)
        self.code_sq_sum += (h * h).sum(dim=0)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-feature mean squared error, code mean, code variance); neutral values before any row."""
        n = self.count.clamp_min(1.0)
        seen = self.count > 0
        feat = torch.where(seen, self.sq_sum / n, torch.ones_like(self.sq_sum))
        mean = self.code_sum / n
        var = torch.where(seen, (self.code_sq_sum / n - mean * mean).clamp_min(0.0), torch.ones_like(mean))
        return feat, mean, var

    def score(self, sq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Per-row calibrated score from per-feature squared errors and codes."""
        feat, mean, var = self.stats()
        # a feature (or code unit) that barely varies must not turn rounding noise into huge scores
        feat = feat.clamp_min(FLOOR * float(feat.mean()) + EPS)
        var = var.clamp_min(FLOOR * float(var.mean()) + EPS)
        sq64 = sq.to(torch.float64)
        recon = (sq64 / feat).mean(dim=1)
        code = ((h.to(torch.float64) - mean) ** 2 / var).mean(dim=1)
        mse = sq64.mean(dim=1) / (feat.mean() + EPS)
        return (recon + CODE_WEIGHT * code + MSE_WEIGHT * mse).to(torch.float32)
