"""The `calibrated` anomaly score (`model.score: calibrated`, the default): reconstruction error and code
position, each on the scale of the validation rows, added.

    score(x) = mean_j  e_j(x)^2 / E_val[e_j^2]   +   CODE_WEIGHT * mean_k (h_k(x) - E_val[h_k])^2 / Var_val[h_k]
               + MSE_WEIGHT * mean_j e_j(x)^2 / E_val[mean_j e_j^2]
               + KNN_WEIGHT * knn(h(x), S) / mean_{s in S} knn(s, S)      (S: sampled validation codes)
             [ + model.subspace_weight * log(1 + r(x) / E_val[r])          (SubspaceTerm; off by default) ]

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
tables of `make eval` (benchmarks/rank_probe.py, ensembles of 3), vowels 0.795 -> 0.880 (PCA 0.907), with
the mean over the eight tables about level (0.841 -> 0.844).

The fourth term is the code's distance to its nearest validation codes: the mean squared distance to the
KNN nearest of a fixed-size random sample of the validation rows' codes (REFERENCE_ROWS, kept in the model),
skipping the nearest one, over the same quantity for the sample's own rows (so it too averages about 1 on the
validation rows). Skipping the nearest makes a row's term the same whether or not the row is in the sample
(a sampled row's nearest is itself). It catches rows in sparse regions of the code space that the
standardized distance misses, because it makes no assumption about the codes' shape: measured with 5-member
ensembles on the eight tables of `make eval` (benchmarks/rank_probe.py, README Evaluation, fourth round),
mean test AUROC 0.858 -> 0.866 at weight 1 (satellite +0.03, pendigits +0.01, mnist +0.01) and 0.864 at
KNN_WEIGHT 0.5. The weight is 0.5 because the term costs elsewhere: on the mixed-type sample table of
tests/test_mixed_table.py (110 input slots, 64 of them one merchant's levels) it lowers the AUROC of the
categorical-only anomalies, which show in the reconstruction of their columns and not in the code's
density (0.953 without the term, 0.939 at weight 0.5, 0.923 at weight 1, in-process on that table); half
the weight keeps most of the gain on numeric tables at half that cost. A sample of 256 codes ranks
as well as one of 512 (0.866 both) and costs half its time in scoring: a 4,096 x 256 distance matrix per
batch and member, about 6 ms on one CPU thread (5 members: 30 ms per 4,096 rows, against 6-75 ms for the
rest of the score on 16-200 features).

The optional fifth term (SubspaceTerm, `model.subspace_weight` > 0) is how far the normalized input lies
outside the principal subspace that keeps SUBSPACE_SHARE (99%) of the training rows' variance, i.e. its
squared length along the minor components: what a linear autoencoder as wide as the data's variance would
fail to reconstruct, so it ranks rows that break near-linear relations between the columns. It is one term
for the whole model (an ensemble does not average it over members). Off by default (issue 24's ninth round,
docs/evaluation.md): at weight 1, `make eval`'s 31 tables rank 0.805 against 0.804 (AP 0.426 against
0.430; 17_InternetAds +0.014, 18_Ionosphere +0.020, 15_Hepatitis +0.025, 22_magic.gamma +0.019 against
8_celeba -0.025, 46_WPBC -0.015, 6_cardio -0.013), and four seeds of the 26 smaller tables, rescored,
+0.004 (AP -0.002): within noise, and the simpler score stays. The components are fitted once, from the
first epoch's training rows (d x d sums, all-reduced over the workers), and then fixed; inputs wider than
MAX_SUBSPACE_FEATURES slots go without the term.

The statistics are gathered while the model is evaluated on the validation rows, which the training loop
does after every epoch (`eval_loss`); `begin_epoch` starts a fresh count. They live in buffers, so the best
epoch's checkpoint carries the statistics of its own weights, and scoring needs nothing else. Before any
validation row has been seen, the score is plain MSE plus the code's squared norm. With several training
workers, each computes them from its own validation rows and rank 0's checkpoint carries rank 0's: a random
share of the validation rows, which is all the statistics need.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

CODE_WEIGHT = 1.0
MSE_WEIGHT = 1.0
KNN_WEIGHT = 0.5
KNN = 5  # neighbours per row (after the nearest, skipped)
REFERENCE_ROWS = 256  # validation codes kept for the kNN term (a uniform random sample of them)
EPS = 1e-12
FLOOR = 1e-3  # of the mean over features (code units)
SUBSPACE_SHARE = 0.99  # of the training rows' variance the subspace keeps (SubspaceTerm)
SUBSPACE_FLOOR = 1e-6  # of the training rows' total variance: the least validation mean SubspaceTerm divides by
MAX_SUBSPACE_FEATURES = 2048  # input slots; wider inputs go without the subspace term


def knn_distance(rows: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(rows,) mean squared distance from each row to its KNN nearest `ref` rows after the nearest one.

    Float32 distances (the ranking needs no more). The k nearest per row: numpy's partition on CPU (about
    4x faster than torch.topk for a 4,096 x 256 matrix, the cost that matters in scoring), topk elsewhere."""
    rows, ref = rows.detach().float(), ref.detach().float()
    k = min(KNN + 1, ref.shape[0])
    with torch.autocast(rows.device.type, enabled=False):  # bf16 distances would be noise
        d = torch.cdist(rows, ref)
    if d.device.type == "cpu":
        near = torch.from_numpy(np.partition(d.numpy(), k - 1, axis=1)[:, :k]).square()  # unordered
    else:
        near = d.topk(k, dim=1, largest=False).values.square()
    return ((near.sum(dim=1) - near.min(dim=1).values) / (k - 1)).to(torch.float64)


class ScoreCalibration(nn.Module):
    """Running validation statistics (float64 sums), a random sample of validation codes, and the score they
    define."""

    def __init__(self, n_features: int, latent_dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sq_sum", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("code_sum", torch.zeros(latent_dim, dtype=torch.float64))
        self.register_buffer("code_sq_sum", torch.zeros(latent_dim, dtype=torch.float64))
        # the sample: each validation row gets a random key; the REFERENCE_ROWS smallest keys stay (inf: empty)
        self.register_buffer("ref", torch.zeros(REFERENCE_ROWS, latent_dim, dtype=torch.float32))
        self.register_buffer("ref_key", torch.full((REFERENCE_ROWS,), float("inf"), dtype=torch.float64))
        self._keys = torch.Generator().manual_seed(0)
        self._knn_norm = None  # the sample's own mean kNN distance, computed when first needed

    def reset(self) -> None:
        for b in (self.count, self.sq_sum, self.code_sum, self.code_sq_sum, self.ref):
            b.zero_()
        self.ref_key.fill_(float("inf"))
        self._keys.manual_seed(0)  # every epoch samples the same validation rows (when they come in one order)
        self._knn_norm = None

    @torch.no_grad()
    def observe(self, sq: torch.Tensor, h: torch.Tensor) -> None:
        """Add a validation batch: per-feature squared errors (rows, d) and codes (rows, k)."""
        h = h.detach().to(torch.float64)
        self.count += sq.shape[0]
        self.sq_sum += sq.detach().to(torch.float64).sum(dim=0)
        self.code_sum += h.sum(dim=0)
        self.code_sq_sum += (h * h).sum(dim=0)
        keys = torch.rand(h.shape[0], generator=self._keys, dtype=torch.float64).to(h.device)
        kept, idx = torch.cat([self.ref_key, keys]).topk(self.ref_key.shape[0], largest=False)
        self.ref.copy_(torch.cat([self.ref, h.to(self.ref.dtype)])[idx])
        self.ref_key.copy_(kept)
        self._knn_norm = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a model saved before the kNN term has no sample: keep the empty one (the term is then 0)
        for name in ("ref", "ref_key"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        self._knn_norm = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-feature mean squared error, code mean, code variance); neutral values before any row."""
        n = self.count.clamp_min(1.0)
        seen = self.count > 0
        feat = torch.where(seen, self.sq_sum / n, torch.ones_like(self.sq_sum))
        mean = self.code_sum / n
        var = torch.where(seen, (self.code_sq_sum / n - mean * mean).clamp_min(0.0), torch.ones_like(mean))
        return feat, mean, var

    def reference(self) -> torch.Tensor:
        """The sampled validation codes (fewer than REFERENCE_ROWS when fewer rows were seen)."""
        return self.ref[torch.isfinite(self.ref_key)]

    def knn_term(self, h: torch.Tensor) -> torch.Tensor:
        """(rows,) the kNN distance of each code over the sample's own mean; 0 with fewer than 2 sampled rows."""
        ref = self.reference()
        if ref.shape[0] < 2:
            return torch.zeros(h.shape[0], dtype=torch.float64, device=h.device)
        if self._knn_norm is None:
            self._knn_norm = float(knn_distance(ref, ref).mean())
        return knn_distance(h, ref) / (self._knn_norm + EPS)

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
        return (recon + CODE_WEIGHT * code + MSE_WEIGHT * mse + KNN_WEIGHT * self.knn_term(h)).to(torch.float32)


class SubspaceTerm(nn.Module):
    """The calibrated score's optional fifth term: how far a row lies outside the principal subspace of the
    training rows, `weight * log1p(r(x) / E_val[r])` (weight: model.subspace_weight), where r is the squared
    length of the (normalized, centred) input along the minor components: those left once the leading ones
    keep SUBSPACE_SHARE of the training rows' variance.

    The components are fitted once, from every training row of the first epoch (summed over the workers by
    `fit`), and then fixed; the validation mean is gathered in each epoch's validation pass, as the other
    terms' statistics are. Where the leading components keep all the variance there are no minor ones and the
    term is 0; the validation mean is floored at SUBSPACE_FLOOR of the total variance, so directions the
    training rows never leave (exact relations between columns) add no rounding noise to normal rows. Before
    `fit`, or on a model saved without the term, it is 0. An ensemble holds one (the term is the same for every
    member), a single model its own; inputs wider than MAX_SUBSPACE_FEATURES slots go without it (the d x d
    sums would be the largest thing in the job).
    """

    def __init__(self, n_features: int, weight: float = 1.0):
        super().__init__()
        self.weight = weight  # model.subspace_weight: a setting, recorded in the manifest
        self.register_buffer("center", torch.zeros(n_features, dtype=torch.float32))
        self.register_buffer("minor", torch.zeros(n_features, 0, dtype=torch.float32))  # (d, minor components)
        self.register_buffer("floor", torch.zeros((), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("val_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("val_count", torch.zeros((), dtype=torch.float64))
        self._sums: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (rows, sum x, sum x x^T)

    @torch.no_grad()
    def observe_training(self, x: torch.Tensor) -> None:
        """Add a training batch to the sums `fit` turns into components (float64; the product in float32)."""
        x = x.detach().float()
        if self._sums is None:
            d = x.shape[1]
            self._sums = (torch.zeros((), dtype=torch.float64, device=x.device),
                          torch.zeros(d, dtype=torch.float64, device=x.device),
                          torch.zeros(d, d, dtype=torch.float64, device=x.device))
        n, s1, s2 = self._sums
        n += x.shape[0]
        s1 += x.sum(dim=0).double()
        s2 += (x.T @ x).double()

    @torch.no_grad()
    def fit(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Components from the training sums, `reduce`d (summed) over the workers first: every worker must
        call it, with or without rows of its own."""
        d = self.center.shape[0]
        n, s1, s2 = self._sums or (torch.zeros((), dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                                   torch.zeros(d, d, dtype=torch.float64))
        self._sums = None
        packed = reduce(torch.cat([n.reshape(1), s1, s2.reshape(-1)]).cpu())
        rows = float(packed[0])
        if rows < 2:
            return
        mean = packed[1:d + 1] / rows
        cov = packed[d + 1:].reshape(d, d) / rows - torch.outer(mean, mean)
        w, v = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
        w = w.clamp_min(0.0)
        total = float(w.sum())
        # the fewest leading components that keep SUBSPACE_SHARE of the variance; the rest are the minor ones
        kept = torch.cumsum(w.flip(0), 0) < SUBSPACE_SHARE * total
        minor = d - min(d, int(kept.sum()) + 1) if total > 0 else 0
        self.center.copy_(mean.float())
        self.minor = v[:, :minor].float().to(self.center.device)
        self.floor.fill_(SUBSPACE_FLOOR * total)
        self.fitted.fill_(True)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """(rows,) squared length of each row along the minor components (float64)."""
        with torch.autocast(x.device.type, enabled=False):
            return ((x.detach().float() - self.center) @ self.minor).square().sum(dim=1).double()

    def reset(self) -> None:
        """Start the validation mean afresh (each epoch's validation pass)."""
        self.val_sum.zero_()
        self.val_count.zero_()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add a validation batch to the mean the term is divided by."""
        if bool(self.fitted):
            self.val_sum += self.residual(x).sum()
            self.val_count += x.shape[0]

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """(rows,) the term (float64); 0 before the components and the validation mean exist."""
        if not bool(self.fitted) or float(self.val_count) == 0 or self.minor.shape[1] == 0:
            return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        mean = torch.maximum(self.val_sum / self.val_count, self.floor)
        return self.weight * torch.log1p(self.residual(x) / (mean + EPS))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of components is the fitted model's; a model saved before the term has none (term 0)
        saved = state_dict.get(prefix + "minor")
        if saved is not None:
            self.minor = torch.empty_like(saved, device=self.minor.device)
        for name in ("center", "minor", "floor", "fitted", "val_sum", "val_count"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
