"""The shared parts every autoencoder kind is built from. Imports only torch: runs and is tested without Ray.

Every model maps a normalized batch `x` (rows, features) through an encoder h = f(x) and a decoder
r = g(h), and exposes the same methods, so training and scoring never branch on the kind:

    loss(x)             -> (scalar training objective, {name: tensor} parts for logging)
    eval_loss(x)        -> the validation objective, summed over rows
    score(x)            -> per-row anomaly score (mean per-column reconstruction error unless said otherwise)
    latent(x)           -> the code written to the output (for a stochastic encoder, the posterior mean)
    score_and_latent(x) -> (score, latent, per-column error) from one forward pass (see SlotLayout)
    forward(x)          -> reconstruction

`Autoencoder` here is the plain undercomplete MLP (`model.kind: dense`); the other kinds subclass it, one
module each beside this one (their settings and checks live in `pipeline/kinds/`, without torch).
`Ensemble` (`model.ensemble` > 1) holds several models of one kind, trained together, with the same methods.
Every model takes the shared MLP settings (`pipeline.kinds.spec.MLP_SETTINGS`) as keyword arguments and its
kind's own settings as one dataclass, `settings`, kept on the model.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.calibration import MAX_SUBSPACE_FEATURES, ScoreCalibration, SubspaceTerm
from pipeline.layout import SlotLayout
from pipeline.models.stack import member_weights, stackable, stacked_recon_loss, worth_stacking

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


def activation_and_slope(name: str, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a), act'(a)) elementwise, for the closed-form Jacobian of an MLP."""
    if name == "linear":
        return a, torch.ones_like(a)
    if name == "relu":
        return F.relu(a), (a > 0).to(a.dtype)
    if name == "tanh":
        t = torch.tanh(a)
        return t, 1 - t * t
    if name == "sigmoid":
        s = torch.sigmoid(a)
        return s, s * (1 - s)
    if name == "gelu":  # nn.GELU's exact form: a * Phi(a); slope Phi(a) + a * phi(a)
        cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        return a * cdf, cdf + a * pdf
    raise ValueError(f"unknown activation {name!r}")


def linear_layers(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def blocks(seq: nn.Sequential) -> list[nn.Sequential]:
    """`seq` cut into blocks that each start at a Linear layer (Linear, activation, dropout)."""
    out: list[list[nn.Module]] = []
    for m in seq:
        if isinstance(m, nn.Linear):
            out.append([])
        out[-1].append(m)
    return [nn.Sequential(*b) for b in out]


class Autoencoder(nn.Module):
    """Undercomplete MLP autoencoder (`kind: dense`): the bottleneck is the only constraint.

    The keyword arguments are the shared MLP settings (`pipeline.kinds.spec.MLP_SETTINGS`); the sizes have no
    default: a job passes the ones its config chose or `pipeline.sizing` resolved. `settings` is the kind's
    own settings dataclass (None for a kind without any); subclasses read it.
    """

    def __init__(self, n_features: int, *, hidden_dims: Sequence[int], latent_dim: int, activation: str = "gelu",
                 dropout: float = 0.0, code_activation: Optional[str] = None, score: str = "recon",
                 settings: Any = None, layout: Optional[SlotLayout] = None):
        super().__init__()
        self.settings = settings  # first: default_code_activation() may depend on it
        self.n_features = n_features
        self._init_layout(layout)
        self.latent_dim = latent_dim
        self.activation = activation
        self.code_activation = code_activation or self.default_code_activation()
        enc_dims = [n_features, *hidden_dims, latent_dim]
        self.encoder = mlp(enc_dims, activation, dropout)
        self.code_act = ACTIVATIONS[self.code_activation]()  # no parameters: state dicts stay the same
        self.decoder = mlp(enc_dims[::-1], activation, dropout)
        self._init_score(score)

    def _init_layout(self, layout: Optional[SlotLayout]) -> None:
        """Per-column errors over `layout` (None: one column per slot). Its index tensors are buffers (they
        follow the model to its device) but not state: the layout is rebuilt from the manifest."""
        self.layout = layout
        self.n_columns = layout.n_columns if layout is not None else self.n_features
        if layout is not None:
            num = torch.tensor(layout.numeric, dtype=torch.long).reshape(-1, 2)
            self.register_buffer("_slots", num[:, 0].contiguous(), persistent=False)
            self.register_buffer("_cols", num[:, 1].contiguous(), persistent=False)
            self._buckets = []  # per width: its run of slots (first, columns, width) or its index matrix's
            for k, (where, cols) in enumerate(layout.buckets()):  # buffer name, and its columns' buffer name
                if isinstance(where[0], tuple):  # an index matrix
                    self.register_buffer(f"_cat_idx{k}", torch.tensor(where, dtype=torch.long), persistent=False)
                    where = f"_cat_idx{k}"
                self.register_buffer(f"_cat_cols{k}", torch.tensor(cols, dtype=torch.long), persistent=False)
                self._buckets.append((where, f"_cat_cols{k}"))

    def column_errors(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(rows, columns) reconstruction error per input column (SlotLayout); without a layout, the squared
        error per feature, as always."""
        if self.layout is None:
            return (recon.float() - x.float()) ** 2
        buckets = [(i if isinstance(i, tuple) else getattr(self, i), getattr(self, c)) for i, c in self._buckets]
        return self.layout.errors(recon.float(), x.float(), self._slots, self._cols, buckets)

    def row_errors(self, x: torch.Tensor) -> torch.Tensor:
        """(rows,) each row's mean per-column reconstruction error (what a trimmed loss ranks rows by)."""
        return self.column_errors(self(x), x).mean(dim=1)

    def recon_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The mean over rows and columns of column_errors: the mean squared error on a numeric-only input."""
        return torch.mean(self.column_errors(recon, x))

    def _init_score(self, score: str) -> None:
        """`recon`: mean per-column error; `calibrated`: see pipeline/calibration.py (buffers only with it)."""
        self.score_kind = score
        self.subspace: Optional[SubspaceTerm] = None  # on the model that scores only (attach_subspace)
        if score == "calibrated":
            self.calibration = ScoreCalibration(self.n_columns, self.latent_dim)

    def default_code_activation(self) -> str:
        return "linear"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.code_act(self.encoder(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mse = self.recon_loss(self(x), x)
        return mse, {"recon": mse.detach()}

    def eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The validation objective (sum over rows, to be divided by the row count after all-reduce): the mean
        squared error, whatever the score; with the calibrated score, also gathers its statistics."""
        if self.subspace is not None:
            self.subspace.observe(x)
        return self._eval_loss(x)

    def _eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encode(x)
        sq = self.column_errors(self.decode(h), x)
        if self.score_kind == "calibrated":
            self.calibration.observe(sq, h)
        return sq.mean(dim=1).sum()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row anomaly score: mean squared reconstruction error in normalized space, or calibrated."""
        return self.score_and_latent(x)[0]

    def _row_score(self, sq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.calibration.score(sq, h) if self.score_kind == "calibrated" else sq.mean(dim=1)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def score_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-row score, latent code, per-column error) in one forward pass."""
        score, h, sq = self._score_and_latent(x)
        return with_subspace(self.subspace, score, x), h, sq

    def _score_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encode(x)
        sq = self.column_errors(self.decode(h), x)
        return self._row_score(sq, h), h.float(), sq

    def begin_epoch(self, epoch: int) -> Optional[str]:
        """Called by the training loop before each epoch; a staged model returns its stage's name."""
        if self.score_kind == "calibrated":
            self.calibration.reset()  # this epoch's validation pass gathers the statistics afresh
        if self.subspace is not None:
            self.subspace.reset()
        return None


class Ensemble(nn.Module):
    """`model.ensemble` models of one kind in one module: trained together on the same batches (one Ray Train
    job, one optimizer, one checkpoint), each from its own random start.

    Same methods as an Autoencoder. The loss and validation objective are the members' mean; a row's score
    is the members' mean score (the calibrated score is already on the validation rows' scale, so the
    members weigh alike); `latent` is member 0's code, so the output keeps one code a feature store can use;
    the per-feature errors are the members' mean. Averaging models that differ only in their start cancels
    part of each one's idiosyncratic errors, which is what ranks the rare rows unevenly.

    Plain (dense) members train as one batched network (`pipeline/models/stack.py`) where a step is small
    enough to gain by it: the same loss and gradients, a few large ops a step instead of one pass per member.
    """

    def __init__(self, members: Sequence[Autoencoder]):
        super().__init__()
        self.subspace: Optional[SubspaceTerm] = None
        self.members = nn.ModuleList(members)
        first = members[0]
        self.n_features, self.latent_dim, self.score_kind = first.n_features, first.latent_dim, first.score_kind
        self.stacked = all(type(m) is Autoencoder for m in members) and stackable(members)
        self._weights = member_weights(members)

    def _mean(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(values)).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mean([m(x) for m in self.members])

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stacked and worth_stacking(x.shape[0], self._weights):
            mse = stacked_recon_loss(self.members, x)  # a plain member's loss is its reconstruction loss alone
            return mse, {"recon": mse.detach()}
        losses, parts = zip(*(m.loss(x) for m in self.members))
        return self._mean(losses), {k: self._mean([p[k] for p in parts]) for k in parts[0]}

    def eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        if self.subspace is not None:
            self.subspace.observe(x)
        return self._mean([m.eval_loss(x) for m in self.members])

    def row_errors(self, x: torch.Tensor) -> torch.Tensor:
        return self._mean([m.row_errors(x) for m in self.members])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].encode(x)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].latent(x)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_and_latent(x)[0]

    def score_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, codes, sqs = zip(*(m.score_and_latent(x) for m in self.members))
        return with_subspace(self.subspace, self._mean(scores), x), codes[0], self._mean(sqs)

    def begin_epoch(self, epoch: int) -> Optional[str]:
        if self.subspace is not None:
            self.subspace.reset()
        return [m.begin_epoch(epoch) for m in self.members][0]


def with_subspace(subspace: Optional[SubspaceTerm], score: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`score` plus the subspace term (pipeline/calibration.py) where the model has one."""
    if subspace is None:
        return score
    return (score.double() + subspace.term(x)).to(score.dtype)


def attach_subspace(model: "Autoencoder | Ensemble", weight: float) -> "Autoencoder | Ensemble":
    """Give the model that scores (a single model, or the ensemble rather than its members) the calibrated
    score's subspace term at `weight` (model.subspace_weight), when that is above 0, it scores `calibrated`
    and its input is at most MAX_SUBSPACE_FEATURES wide."""
    if weight > 0 and model.score_kind == "calibrated" and model.n_features <= MAX_SUBSPACE_FEATURES:
        model.subspace = SubspaceTerm(model.n_features, weight)
    return model
