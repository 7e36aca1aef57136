"""Autoencoders for tabular feature vectors. Imports only torch: runs and is tested without Ray.

Every model maps a normalized batch `x` (rows, features) through an encoder h = f(x) and a decoder
r = g(h), and exposes the same methods, so training and scoring never branch on the kind:

    loss(x)             -> (scalar training objective, {name: tensor} parts for logging)
    eval_loss(x)        -> the validation objective, summed over rows
    score(x)            -> per-row anomaly score (mean squared reconstruction error unless said otherwise)
    latent(x)           -> the code written to the output (for a stochastic encoder, the posterior mean)
    score_and_latent(x) -> (score, latent, per-feature squared error) from one forward pass
    forward(x)          -> reconstruction

The kinds (`model.kind`), each a class below:

    dense        undercomplete MLP; the bottleneck is the only constraint (linear + MSE: the PCA subspace)
    denoising    reconstructs the clean x from a corrupted one (Gaussian or masking noise)
    sparse       L1 or KL(target || mean activation) penalty on the code; may be overcomplete
    contractive  penalty on ||df/dx||_F^2, the encoder Jacobian, computed in closed form for the MLP
    variational  Gaussian q(h|x) and p(x|h); loss = -ELBO with a weighted KL term
    stacked      greedy layer-wise pretraining, then end-to-end fine-tuning (stage chosen by the epoch)

`build_model(n_features, **model_section)` picks the class from `kind` and passes each class the settings
it declares; settings that belong to other kinds are ignored.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.calibration import ScoreCalibration

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
    """Undercomplete MLP autoencoder (`kind: dense`): the bottleneck is the only constraint."""

    kind = "dense"

    def __init__(self, n_features: int, hidden_dims: Sequence[int] = (64, 32), latent_dim: int = 8,
                 activation: str = "gelu", dropout: float = 0.0, code_activation: Optional[str] = None,
                 score: str = "recon"):
        super().__init__()
        self.n_features = n_features
        self.latent_dim = latent_dim
        self.activation = activation
        self.code_activation = code_activation or self.default_code_activation()
        enc_dims = [n_features, *hidden_dims, latent_dim]
        self.encoder = mlp(enc_dims, activation, dropout)
        self.code_act = ACTIVATIONS[self.code_activation]()  # no parameters: state dicts stay the same
        self.decoder = mlp(enc_dims[::-1], activation, dropout)
        self._init_score(score)

    def _init_score(self, score: str) -> None:
        """`recon`: mean squared error; `calibrated`: see pipeline/calibration.py (buffers only with it)."""
        self.score_kind = score
        if score == "calibrated":
            self.calibration = ScoreCalibration(self.n_features, self.latent_dim)

    def default_code_activation(self) -> str:
        return "linear"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.code_act(self.encoder(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        recon = self(x)
        mse = torch.mean((recon.float() - x.float()) ** 2)
        return mse, {"recon": mse.detach()}

    def eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The validation objective (sum over rows, to be divided by the row count after all-reduce): the mean
        squared error, whatever the score; with the calibrated score, also gathers its statistics."""
        h = self.encode(x)
        sq = (self.decode(h).float() - x.float()) ** 2
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
        """(per-row score, latent code, per-feature squared error) in one forward pass."""
        h = self.encode(x)
        recon = self.decode(h).float()
        sq = (recon - x.float()) ** 2
        return self._row_score(sq, h), h.float(), sq

    def begin_epoch(self, epoch: int) -> Optional[str]:
        """Called by the training loop before each epoch; a staged model returns its stage's name."""
        if self.score_kind == "calibrated":
            self.calibration.reset()  # this epoch's validation pass gathers the statistics afresh
        return None


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


class DenoisingAutoencoder(Autoencoder):
    """`kind: denoising`: learns to map a corrupted x~ back to the clean x; scored on clean input.

    Gaussian noise adds noise_level * N(0, 1) to each (normalized) feature; masking noise sets each feature
    to 0, its training mean, with probability noise_level.
    """

    kind = "denoising"

    def __init__(self, n_features: int, noise: str = "gaussian", noise_level: float = 0.1, **kw: Any):
        super().__init__(n_features, **kw)
        self.noise, self.noise_level = noise, noise_level

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise == "gaussian":
            return x + self.noise_level * torch.randn_like(x)
        if self.noise == "mask":
            return x * (torch.rand_like(x) >= self.noise_level).to(x.dtype)
        raise ValueError(f"model.noise {self.noise!r} is not gaussian or mask")

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        recon = self(self.corrupt(x))
        mse = torch.mean((recon.float() - x.float()) ** 2)
        return mse, {"recon": mse.detach()}


class SparseAutoencoder(Autoencoder):
    """`kind: sparse`: a penalty that keeps most code units near zero, so the code may be overcomplete.

    l1: weight * mean |h| over rows and units (code activation relu by default: units can be exactly 0).
    kl: weight * sum_j KL(rho || rho_j), rho_j the batch-mean activation of unit j in (0, 1) (sigmoid code).
    """

    kind = "sparse"

    def __init__(self, n_features: int, sparsity: str = "l1", sparsity_weight: float = 1e-3,
                 sparsity_target: float = 0.05, **kw: Any):
        self.sparsity = sparsity
        super().__init__(n_features, **kw)
        self.sparsity_weight, self.sparsity_target = sparsity_weight, sparsity_target

    def default_code_activation(self) -> str:
        return "sigmoid" if self.sparsity == "kl" else "relu"

    def penalty(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        if self.sparsity == "l1":
            return h.abs().mean()
        rho = self.sparsity_target
        rho_hat = h.mean(dim=0).clamp(1e-6, 1 - 1e-6)
        return torch.sum(rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat)))

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.encode(x)
        mse = torch.mean((self.decode(h).float() - x.float()) ** 2)
        pen = self.penalty(h)
        return mse + self.sparsity_weight * pen, {"recon": mse.detach(), "sparsity": pen.detach(),
                                                  "code_mean": h.detach().float().abs().mean()}


class ContractiveAutoencoder(Autoencoder):
    """`kind: contractive`: MSE + weight * mean over rows of ||dh/dx||_F^2 (closed form for the MLP)."""

    kind = "contractive"

    def __init__(self, n_features: int, contractive_weight: float = 1e-3, **kw: Any):
        super().__init__(n_features, **kw)
        self.contractive_weight = contractive_weight

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, jac = encoder_jacobian_sq_norm(self, x)
        mse = torch.mean((self(x).float() - x.float()) ** 2)
        pen = jac.mean()
        return mse + self.contractive_weight * pen, {"recon": mse.detach(), "jacobian": pen.detach()}


class VariationalAutoencoder(Autoencoder):
    """`kind: variational`: q(h|x) = N(mu(x), diag exp(logvar(x))), p(h) = N(0, I), p(x|h) = N(g(h), diag s^2).

    loss = mean over rows of  -E_q[log p(x|h)] + kl_weight * KL(q(h|x) || p(h))  (one reparameterized sample);
    s^2 is a learned per-feature variance. latent(x) is mu(x). score is the squared reconstruction error of
    g(mu(x)) (`score: recon`) or the negative ELBO with its likelihood term taken at h = mu(x) (`score: elbo`):
    both deterministic, so a row always gets the same score.
    """

    kind = "variational"
    LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0  # keeps exp() finite when a unit's posterior collapses or explodes

    def __init__(self, n_features: int, hidden_dims: Sequence[int] = (64, 32), latent_dim: int = 8,
                 activation: str = "gelu", dropout: float = 0.0, kl_weight: float = 1.0, score: str = "recon",
                 **kw: Any):
        nn.Module.__init__(self)
        self.n_features, self.latent_dim = n_features, latent_dim
        self.activation, self.code_activation = activation, "linear"
        self.kl_weight = kl_weight
        self._init_score(score)
        body = [n_features, *hidden_dims]
        self.encoder = mlp(body, activation, dropout, last_activation=True) if hidden_dims else nn.Identity()
        self.mu = nn.Linear(body[-1], latent_dim)
        self.logvar = nn.Linear(body[-1], latent_dim)
        self.code_act = nn.Identity()
        self.decoder = mlp([latent_dim, *reversed(list(hidden_dims)), n_features], activation, dropout)
        self.out_logvar = nn.Parameter(torch.zeros(n_features))  # log s^2 per feature; data is unit-variance

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
        mse = torch.mean((recon.float() - x.float()) ** 2)
        return nll + self.kl_weight * kl, {"recon": mse.detach(), "nll": nll.detach(), "kl": kl.detach()}

    def neg_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row negative ELBO with the likelihood at h = mu(x) (deterministic)."""
        mu, logvar = self.posterior(x)
        return self._nll(x, self.decode(mu)) + self.kl_weight * self.kl(mu, logvar)

    def eval_loss(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.posterior(x)
        recon = self.decode(mu)
        if self.score_kind == "calibrated":
            self.calibration.observe((recon.float() - x.float()) ** 2, mu)
        # early stopping follows the training objective, whatever the score
        return (self._nll(x, recon) + self.kl_weight * self.kl(mu, logvar)).sum()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_and_latent(x)[0]

    def score_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(x)
        recon = self.decode(mu)
        sq = (recon.float() - x.float()) ** 2
        if self.score_kind == "elbo":
            s = self._nll(x, recon) + self.kl_weight * self.kl(mu, logvar)
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


class StackedAutoencoder(Autoencoder):
    """`kind: stacked`: greedy layer-wise pretraining, then end-to-end fine-tuning of the whole stack.

    With encoder blocks e_1..e_L and decoder blocks d_L..d_1 (d_l mirrors e_l), stage l (l = 1..L) trains the
    shallow autoencoder d_l(e_l(z)) to reconstruct z = e_{l-1}(...e_1(x)), the lower blocks frozen; each
    stage lasts `pretrain_epochs` epochs. Then every epoch fine-tunes the full model on MSE. The stage is a
    function of the epoch, so a run resumed from a checkpoint picks up in the right stage.
    """

    kind = "stacked"

    def __init__(self, n_features: int, pretrain_epochs: int = 2, **kw: Any):
        super().__init__(n_features, **kw)
        self.pretrain_epochs = pretrain_epochs
        # tuples, so nn.Module does not register these views of encoder/decoder a second time
        self.enc_blocks = tuple(blocks(self.encoder))
        self.dec_blocks = tuple(blocks(self.decoder))
        self.stage = self.n_layers  # fine-tuning unless the training loop says otherwise

    @property
    def n_layers(self) -> int:
        return len(self.enc_blocks)

    def stage_at(self, epoch: int) -> int:
        """0-based layer being pretrained at `epoch`, or n_layers when fine-tuning."""
        return min(epoch // max(self.pretrain_epochs, 1), self.n_layers) if self.pretrain_epochs else self.n_layers

    def stage_name(self, stage: int) -> str:
        return "finetune" if stage >= self.n_layers else f"pretrain-{stage + 1}/{self.n_layers}"

    def begin_epoch(self, epoch: int) -> Optional[str]:
        super().begin_epoch(epoch)
        self.stage = self.stage_at(epoch)
        return self.stage_name(self.stage)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage >= self.n_layers:
            return super().loss(x)
        l = self.stage
        with torch.no_grad():  # the blocks below are frozen: their output is this stage's data
            z = x
            for b in self.enc_blocks[:l]:
                z = b(z)
        h = self.enc_blocks[l](z)
        if l == self.n_layers - 1:
            h = self.code_act(h)
        recon = self.dec_blocks[self.n_layers - 1 - l](h)
        mse = torch.mean((recon.float() - z.float()) ** 2)
        return mse, {"recon": mse.detach()}


MODEL_KINDS: dict[str, type[Autoencoder]] = {
    cls.kind: cls for cls in (Autoencoder, DenoisingAutoencoder, SparseAutoencoder, ContractiveAutoencoder,
                              VariationalAutoencoder, StackedAutoencoder)
}


def _accepted(cls: type) -> set[str]:
    """Keyword arguments a model class takes, following **kw up to the base class."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, Autoencoder):
            break
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names - {"self", "n_features"}


def build_model(n_features: int, kind: str = "dense", **settings: Any) -> Autoencoder:
    """The autoencoder named by `kind`, built from the model config section's settings (others' ignored)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind {kind!r} is not available (have: {', '.join(sorted(MODEL_KINDS))})")
    cls = MODEL_KINDS[kind]
    if "auto" in (settings.get("latent_dim"), settings.get("hidden_dims")):  # sizes not chosen by a job yet
        from pipeline.sizing import auto_sizes  # noqa: PLC0415 - sizing imports the config module

        chosen = dict(zip(("hidden_dims", "latent_dim"), auto_sizes(n_features)))
        settings = {k: chosen[k] if v == "auto" and k in chosen else v for k, v in settings.items()}
    keep = _accepted(cls)
    return cls(n_features, **{k: v for k, v in settings.items() if k in keep})
