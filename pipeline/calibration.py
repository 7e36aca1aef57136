"""The `calibrated` anomaly score (`model.score: calibrated`, the default): reconstruction error and code
position, each on the scale of the validation rows, weighted by how far its top rows stand out, added.

    score(x) = w_recon * mean_j  e_j(x)^2 / E_val[e_j^2]
               + w_code * mean_k (h_k(x) - E_val[h_k])^2 / Var_val[h_k]
               + w_mse  * mean_j e_j(x)^2 / E_val[mean_j e_j^2]
               + w_knn  * knn(h(x), S) / mean_{s in S} knn(s, S)          (S: sampled validation codes)
             [ + model.subspace_weight * log(1 + r(x) / E_val[r])          (SubspaceTerm; off by default) ]

    w_t ∝ BASE_WEIGHTS[t] * q0.99_val(t) / median_val(t),   sum_t w_t = sum(BASE_WEIGHTS) = 3.5

The terms' weights (`spread_weights`) are fitted once, at the end of training, by the best model itself: its four
terms over every validation row, on a fixed log2 histogram (all-reduced over the workers; 4.4% bins), give each
term's spread, its 99th percentile over its median (at most 100), and the base weights (1, CODE_WEIGHT, MSE_WEIGHT,
KNN_WEIGHT) are scaled by it. A term whose top 1% stand far above its bulk is the one that sets some rows apart on
this table; one whose values sit close together adds mostly noise to the ranking (docs/evaluation.md, twelfth
round). A model saved before the fitted weights scores with BASE_WEIGHTS.

e_j is feature j's reconstruction error and h the code. Plain mean squared error lets the features the
model reconstructs worst dominate every row's score, and it misses rows that lie on the learned manifold but
far out along it (the model reconstructs them well). Dividing each feature's error by its validation mean
puts every feature on the same footing, and the second term (a diagonal Mahalanobis distance of the code)
catches the far-out rows. Measured in a probe of the same networks on ADBench tables (README, Evaluation):
mean test AUROC on cardio, pendigits, thyroid and vowels 0.800 with plain MSE, 0.877 with this score
(pendigits 0.79 -> 0.94); it loses where anomalies sit in sparse pockets inside the data (vowels 0.91 -> 0.72).

The third term is plain mean squared error over its validation mean (every term then averages 1 on the
validation rows). It gives back what the first two lose where anomalies sit in sparse pockets inside the
data and are simply reconstructed badly on the features that vary most: vowels 0.795 -> 0.880, the mean
over the eight tables of `make eval` level (0.841 -> 0.844; benchmarks/rank_probe.py, 3 seeds).

The fourth term is the code's distance to its nearest validation codes: the mean squared distance to the
KNN nearest of a fixed-size random sample of the validation rows' codes (REFERENCE_ROWS, kept in the model),
a sampled row's own code left out, over the same quantity for the sample's own rows (so it too averages about
1 on the validation rows, and on unseen rows alike: `knn_distance`). It catches rows in sparse regions of the
code space that the standardized distance misses, because it makes no assumption about the codes' shape:
measured with 5-member ensembles on the eight tables of `make eval` (benchmarks/rank_probe.py, fourth round),
mean test AUROC 0.858 -> 0.866 at weight 1 (satellite +0.03, pendigits +0.01, mnist +0.01) and 0.864 at
KNN_WEIGHT 0.5. The weight is 0.5 because the term costs elsewhere: on the mixed-type sample table of
tests/test_mixed_table.py (110 input slots, 64 of them one merchant's levels) it lowers the AUROC of the
categorical-only anomalies, which show in the reconstruction of their columns and not in the code's
density (0.953 without the term, 0.939 at weight 0.5, 0.923 at weight 1, in-process on that table); half
the weight keeps most of the gain on numeric tables at half that cost. A sample of 256 codes ranks
as well as one of 512 (0.866 both) and costs half its time in scoring: a 4,096 x 256 distance matrix per
batch and member, about 6 ms on one CPU thread (5 members: 30 ms per 4,096 rows, against 6-75 ms for the
rest of the score on 16-200 features).

The optional fifth term (SubspaceTerm, `model.subspace_weight` > 0) is the normalized input's squared length
along the minor components, outside the principal subspace that keeps SUBSPACE_SHARE (99%) of the training
rows' variance: it ranks rows that break near-linear relations between the columns. One term for the whole
model. Off by default: within noise on the 31 tables of `make eval`, with AP lower (docs/evaluation.md, ninth
round). The components are fitted once, from the first epoch's training rows (d x d sums, all-reduced over
the workers), and then fixed; inputs wider than MAX_SUBSPACE_FEATURES slots go without the term.

The statistics are gathered while the model is evaluated on the validation rows, which the training loop
does after every epoch (`eval_loss`); `begin_epoch` starts a fresh count. They live in buffers, so the best
epoch's checkpoint carries the statistics of its own weights, and scoring needs nothing else. The term weights
are buffers too, fitted by a pass of the kept model alone (pipeline/train/validate.py) before the pass that
sets the threshold. Both passes score the rows the statistics came from, so on one worker they score each row
with the statistics less that row (`held_out_rows`, `ScoreCalibration.held_out_stats`), as an unseen row is
scored. Before any validation row has been seen, the score is plain MSE plus the code's squared
norm. With several training workers, each computes them from its own validation rows and rank 0's checkpoint
carries rank 0's: a random share of the validation rows, which is all the statistics need (the term weights
come from every rank's rows).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

CODE_WEIGHT = 1.0
MSE_WEIGHT = 1.0
KNN_WEIGHT = 0.5
KNN = 5  # neighbours per row (the row itself, where it is in the sample, skipped)
SAME_CODE = 1e-10  # a squared distance under this share of 1 + the code's squared norm: the same code (knn_distance)
NEAR_ZERO = 1e-4  # the same share for cdist's squared distance: a row maybe in the sample, checked exactly
REFERENCE_ROWS = 256  # validation codes kept for the kNN term (a uniform random sample of them)
EPS = 1e-12
FLOOR = 1e-3  # of the mean over features (code units)
MIN_HELD_OUT_ROWS = 5  # held_out_rows needs this many observed rows (from one other row a code variance is 0)
SUBSPACE_SHARE = 0.99  # of the training rows' variance the subspace keeps (SubspaceTerm)
SUBSPACE_FLOOR = 1e-6  # of the training rows' total variance: the least validation mean SubspaceTerm divides by
MAX_SUBSPACE_FEATURES = 2048  # input slots; wider inputs go without the subspace term
TERMS = ("recon", "code", "mse", "knn")
BASE_WEIGHTS = (1.0, CODE_WEIGHT, MSE_WEIGHT, KNN_WEIGHT)  # each term's weight before its spread scales it
TAIL_QUANTILE = 0.99  # a term's spread: this quantile of its validation values over their median
MAX_SPREAD = 100.0  # where a term's median is about 0 (rows whose codes coincide), it cannot take every weight
BINS_PER_OCTAVE = 16  # the spread's histogram of log2(term): 4.4% wide bins
LOG2_RANGE = (-64, 64)  # values at or below 2**-64 (0 too) share bin 0; values above 2**64 share the last
N_BINS = (LOG2_RANGE[1] - LOG2_RANGE[0]) * BINS_PER_OCTAVE + 1


def knn_distance(rows: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(rows,) mean squared distance from each row to its KNN nearest `ref` rows other than itself: the nearest
    is skipped only where it is the row's own code (a sampled row, or a row identical to one), so unseen rows
    score as the sampled rows do (docs/evaluation.md, sixteenth round: skipping every row's nearest scored
    unseen rows 8% to 37% higher, and a threshold set on the sampled rows flagged more than its share).

    Float32 distances; the k nearest by numpy's partition on CPU (about 4x faster than torch.topk for a 4,096 x
    256 matrix), topk elsewhere; "its own code" from exact distances, for rows whose nearest is about 0."""
    rows, ref = rows.detach().float(), ref.detach().float()
    k = min(KNN + 1, ref.shape[0])
    with torch.autocast(rows.device.type, enabled=False):  # bf16 distances would be noise
        d = torch.cdist(rows, ref)
    if d.device.type == "cpu":
        near = torch.from_numpy(np.partition(d.numpy(), k - 1, axis=1)[:, :k]).square()  # unordered
    else:
        near = d.topk(k, dim=1, largest=False).values.square()
    nearest, norm = near.min(dim=1).values, 1.0 + rows.square().sum(dim=1)
    itself = torch.zeros_like(nearest, dtype=torch.bool)
    maybe = nearest <= NEAR_ZERO * norm  # cdist's error at 0 is far below this; few rows but sampled ones
    if maybe.any():
        exact = (rows[maybe].unsqueeze(1) - ref.unsqueeze(0)).square().sum(dim=2).min(dim=1).values
        itself[maybe] = exact <= SAME_CODE * norm[maybe]
    dropped = torch.where(itself, nearest, near.max(dim=1).values)  # itself, or the (k+1)th nearest
    return ((near.sum(dim=1) - dropped) / (k - 1)).to(torch.float64)


def _moments(sq_sum: torch.Tensor, code_sum: torch.Tensor, code_sq_sum: torch.Tensor, n: torch.Tensor):
    """(per-feature mean error, code mean, code variance) of `n` rows from their sums (ScoreCalibration's)."""
    mean = code_sum / n
    return sq_sum / n, mean, (code_sq_sum / n - mean * mean).clamp_min(0.0)


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
        # the terms' weights: BASE_WEIGHTS until the run's last validation pass fits them (fit_weights)
        self.register_buffer("term_weight", torch.tensor(BASE_WEIGHTS, dtype=torch.float64))
        self._keys = torch.Generator().manual_seed(0)
        self._knn_norm = None  # the sample's own mean kNN distance, computed when first needed
        self._counts: Optional[torch.Tensor] = None  # the terms' histograms while count_terms is on
        self.held_out = False  # while True, each scored row is one of the observed rows: see held_out_stats

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
        # a model saved before the kNN term has no sample: keep the empty one (the term is then 0); one saved
        # before the fitted weights scores with BASE_WEIGHTS
        for name in ("ref", "ref_key", "term_weight"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        self._knn_norm = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-feature mean squared error, code mean, code variance); neutral values before any row."""
        feat, mean, var = _moments(self.sq_sum, self.code_sum, self.code_sq_sum, self.count.clamp_min(1.0))
        seen = self.count > 0
        return torch.where(seen, feat, torch.ones_like(feat)), mean, torch.where(seen, var, torch.ones_like(var))

    def held_out_stats(self, sq: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`stats()` for rows among the observed ones, each without itself: (rows, d) per-feature mean errors,
        (rows, k) code means and variances over the other count - 1 rows. A row scored with statistics it helped
        make scores lower than an unseen row (a threshold on such scores flags more than its share of new rows);
        left out, it scores as an unseen row. Under MIN_HELD_OUT_ROWS rows they score in-sample (`terms`)."""
        sq64, h64 = sq.to(torch.float64), h.to(torch.float64)
        return _moments(self.sq_sum - sq64, self.code_sum - h64, self.code_sq_sum - h64 * h64, self.count - 1)

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

    def terms(self, sq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(rows, 4) the score's terms (TERMS), unweighted, float64, from per-feature squared errors and codes."""
        held_out = self.held_out and self.count >= MIN_HELD_OUT_ROWS
        feat, mean, var = self.held_out_stats(sq, h) if held_out else self.stats()
        # a feature (or code unit) that barely varies must not turn rounding noise into huge scores (per row
        # where the statistics are per row)
        feat = feat.clamp_min(FLOOR * feat.mean(dim=-1, keepdim=True) + EPS)
        var = var.clamp_min(FLOOR * var.mean(dim=-1, keepdim=True) + EPS)
        sq64 = sq.to(torch.float64)
        recon = (sq64 / feat).mean(dim=1)
        code = ((h.to(torch.float64) - mean) ** 2 / var).mean(dim=1)
        mse = sq64.mean(dim=1) / (feat.mean(dim=-1) + EPS)
        return torch.stack([recon, code, mse, self.knn_term(h)], dim=1)

    def score(self, sq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Per-row calibrated score: the terms, weighted (`term_weight`) and added."""
        t = self.terms(sq, h)
        if self._counts is not None:
            self._counts += term_histogram(t).cpu()
        return (t @ self.term_weight.to(t.device)).to(torch.float32)

    def count_terms(self) -> None:
        """From now on, every scored row adds its terms to histograms (`take_counts`), for fit_weights."""
        self._counts = torch.zeros(len(TERMS), N_BINS, dtype=torch.float64)

    def take_counts(self) -> torch.Tensor:
        """(4, N_BINS) the histograms since count_terms (zeros without it); counting stops."""
        counts = self._counts if self._counts is not None else torch.zeros(len(TERMS), N_BINS, dtype=torch.float64)
        self._counts = None
        return counts

    @torch.no_grad()
    def fit_weights(self, counts: torch.Tensor) -> None:
        """Weigh each term by its spread over the validation rows (`counts`: their histograms, summed over the
        workers): BASE_WEIGHTS times spread_weights, rescaled to the same sum."""
        self.term_weight.copy_(spread_weights(counts))


def term_histogram(terms: torch.Tensor) -> torch.Tensor:
    """(k, N_BINS) counts of each column of `terms` (rows, k) on the fixed log2 grid (bin 0: at or below
    2**LOG2_RANGE[0], zero and negative values too)."""
    low = LOG2_RANGE[0]
    t = terms.detach().to(torch.float64)
    pos = t > 2.0 ** low
    b = torch.floor((torch.log2(t.clamp_min(2.0 ** low)) - low) * BINS_PER_OCTAVE).long() + 1
    b = torch.where(pos, b.clamp(1, N_BINS - 1), torch.zeros_like(b))
    out = torch.zeros(t.shape[1], N_BINS, dtype=torch.float64, device=t.device)
    out.scatter_add_(1, b.T.contiguous(), torch.ones_like(b.T, dtype=torch.float64))
    return out


def histogram_quantile(counts: torch.Tensor, q: float) -> torch.Tensor:
    """(k,) the q quantile of each row of `counts` (term_histogram's grid): its bin's geometric centre (0 for
    bin 0 or an empty row)."""
    total = counts.sum(dim=1, keepdim=True)
    cum = counts.cumsum(dim=1)
    b = (cum < q * total).sum(dim=1).clamp(max=N_BINS - 1)
    centre = torch.exp2(LOG2_RANGE[0] + (b.to(torch.float64) - 0.5) / BINS_PER_OCTAVE)
    return torch.where((b > 0) & (total[:, 0] > 0), centre, torch.zeros_like(centre))


def spread_weights(counts: torch.Tensor) -> torch.Tensor:
    """(4,) the terms' weights from their validation histograms: BASE_WEIGHTS[k] times term k's spread
    (its TAIL_QUANTILE over its median, at most MAX_SPREAD; 1 where the median is 0), rescaled so the weights
    add up as BASE_WEIGHTS do. A term whose top rows stand far above its bulk is the one that sets rows apart."""
    base = torch.tensor(BASE_WEIGHTS, dtype=torch.float64)
    top, mid = histogram_quantile(counts, TAIL_QUANTILE), histogram_quantile(counts, 0.5)
    spread = torch.where(mid > 0, top / mid.clamp_min(EPS), torch.ones_like(mid)).clamp(1.0, MAX_SPREAD)
    w = base * spread
    return w * (base.sum() / w.sum())


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


@contextmanager
def held_out_rows(model: nn.Module, on: bool = True) -> Iterator[None]:
    """While open (and `on`), every calibrated score in `model` scores each row with its validation
    statistics less that row (ScoreCalibration.held_out_stats): for passes over the very rows it observed."""
    calibrations = [m for m in model.modules() if isinstance(m, ScoreCalibration)]
    for c in calibrations:
        c.held_out = on
    try:
        yield
    finally:
        for c in calibrations:
            c.held_out = False


def fitted_term_weights(state: dict[str, torch.Tensor]) -> Optional[dict[str, float]]:
    """The calibrated score's term weights in a model's state dict, averaged over an ensemble's members (TERMS
    -> weight); None for a model without the calibrated score."""
    found = [v for k, v in state.items() if k.endswith("calibration.term_weight")]
    if not found:
        return None
    mean = torch.stack([v.to(torch.float64) for v in found]).mean(dim=0)
    return {name: round(float(w), 4) for name, w in zip(TERMS, mean)}

