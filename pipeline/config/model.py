"""The config's `model` section: the settings every kind shares (`SharedModelSection`) and, flat beside them,
each registered kind's own (`ModelSection`, built from the specs in pipeline/kinds/). Checks a kind's
scores and settings against its spec; loads without torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pipeline.errors import check_config as _check
from pipeline.kinds import KINDS, kinds_with
from pipeline.kinds.spec import KindSpec
from pipeline.sizing import AUTO


@dataclass
class SharedModelSection:
    """The `model` settings every kind shares. `ModelSection` (below) adds each registered kind's own settings
    (declared, documented and range-checked in its module under pipeline/kinds/) as flat `model.<setting>` keys.
    A kind ignores the others' settings (their ranges are still checked), so `--set model.kind=...` alone
    switches kinds."""

    kind: str = "dense"
    """Which autoencoder (a kind registered in pipeline/kinds/); see the README's table of kinds."""
    hidden_dims: Union[list[int], Literal["auto"]] = AUTO
    """Widths of the encoder's hidden layers, input side first; the decoder mirrors them. `auto`: one layer,
    sized from the input's width and rows (pipeline/sizing.py); the manifest records the widths chosen."""
    latent_dim: Union[int, Literal["auto"]] = AUTO
    """Width of the code h = f(x); smaller than the input for an undercomplete model. `auto`: about a quarter
    of the input width (1 to 32), recorded in the manifest."""
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "linear"] = "gelu"
    """Nonlinearity between layers; `linear` with MSE learns the PCA subspace."""
    dropout: float = 0.0
    """Dropout after each hidden layer while training."""
    code_activation: Optional[Literal["relu", "gelu", "tanh", "sigmoid", "linear"]] = None
    """Nonlinearity on the code itself; unset: linear, except sparse (relu for l1, sigmoid for kl)."""
    score: Literal["calibrated", "recon", "elbo"] = "calibrated"
    """The anomaly score. `calibrated`: each feature's squared error over its validation mean, plus the code's
    squared distance from the validation codes in standard deviations, plus mean squared error over its
    validation mean, plus the code's distance to its nearest sampled validation codes (pipeline/calibration.py);
    `recon`: mean squared reconstruction error; `elbo` (variational only): -ELBO. A variational code is its
    posterior mean."""
    ensemble: Union[int, Literal["auto"]] = AUTO
    """Models of the kind trained side by side in the same job (one optimizer, each from its own random
    start) whose scores are averaged; `latent` is the first one's code. `auto`: 5 with backprop, 1 with
    recirculation (pipeline/sizing.py); the manifest records the count."""
    member_latent_dims: Union[list[int], Literal["auto"]] = AUTO
    """Each ensemble member's code width, member 0 (whose code is `latent`) first. `auto`: with `latent_dim:
    auto`, the members' codes spread from an eighth to half of the input width around member 0's quarter
    (member 0 at most 32 wide, the others at most 256; pipeline/sizing.py); with an explicit `latent_dim`,
    every member that width. Recorded in the manifest."""
    subspace_weight: float = 0.0
    """Weight of the calibrated score's subspace term, `log(1 + r / mean_val r)` with r the input's squared
    distance from the principal subspace that keeps 99% of the training rows' variance (pipeline/calibration.py,
    SubspaceTerm). 0 (the default): no such term. It ranks rows that break near-linear relations between the
    columns; on the benchmark tables it helps some and costs others, 1 about level on the mean
    (docs/evaluation.md, ninth round): measure it on your own labelled rows with `jobs.evaluate`."""
    align_to: str = "latest"
    """Whose coordinates the emitted `latent` uses (pipeline/alignment.py). `latest`: the finished run that
    `--model latest` would pick under artifacts.uri, when its input layout and code width match; a run name
    under artifacts.uri; `none`: the model starts its own code space. The anomaly score never uses the map."""
    align_min_r2: float = 0.8
    """The fit (held-out R^2 of mapped codes against the previous model's) below which the model starts its own
    code space rather than emit codes that only roughly mean the old ones."""

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, "model.kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        _check(self.latent_dim == AUTO or self.latent_dim >= 1, "model.latent_dim", f"{self.latent_dim} must be >= 1")
        _check(self.hidden_dims == AUTO or all(h >= 1 for h in self.hidden_dims), "model.hidden_dims",
               "widths must be >= 1")
        _check(self.ensemble == AUTO or self.ensemble >= 1, "model.ensemble", f"{self.ensemble} must be >= 1")
        _check(self.member_latent_dims == AUTO or (len(self.member_latent_dims) >= 1
                                                   and all(w >= 1 for w in self.member_latent_dims)),
               "model.member_latent_dims", "widths must be >= 1 (one per ensemble member)")
        _check(self.member_latent_dims == AUTO or self.ensemble == AUTO
               or len(self.member_latent_dims) == self.ensemble, "model.member_latent_dims",
               f"{self.member_latent_dims} has not one width per model (model.ensemble: {self.ensemble})")
        _check(AUTO in (self.member_latent_dims, self.latent_dim) or self.member_latent_dims[0] == self.latent_dim,
               "model.member_latent_dims", f"{self.member_latent_dims}: the first is member 0's code, "
               f"model.latent_dim {self.latent_dim}")
        _check(bool(self.align_to.strip()) and "/" not in self.align_to, "model.align_to",
               f"{self.align_to!r}: `latest`, `none` or a run name under artifacts.uri")
        _check(0.0 <= self.align_min_r2 <= 1.0, "model.align_min_r2", f"{self.align_min_r2} must be in [0, 1]")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"{self.dropout} must be in [0, 1)")
        _check(self.subspace_weight >= 0.0, "model.subspace_weight", f"{self.subspace_weight} must be >= 0")
        _check(self.subspace_weight == 0.0 or self.score == "calibrated", "model.subspace_weight",
               f"{self.subspace_weight}: the subspace term is part of the calibrated score, not {self.score}")
        _check(self.score in self.spec.scores, "model.score",
               f"{self.score} is the {' or '.join(kinds_with('scores', self.score))} kind's score, not "
               f"{self.kind}'s; use {' or '.join(self.spec.scores)}")
        for spec in KINDS.values():
            spec.settings_from(vars(self))  # range checks of every kind's settings, in its settings dataclass
        self.spec.check(self)

    @property
    def spec(self) -> KindSpec:
        """The kind's spec: its settings dataclass, scores, learning rules and training hooks."""
        return KINDS[self.kind]

    @property
    def kind_settings(self) -> Any:
        """The kind's own settings dataclass, as its model receives it."""
        return self.spec.settings_from(vars(self))

    @property
    def pretrain_epochs_total(self) -> int:
        """Epochs before the whole model trains (stacked: one stage per layer pair); 0 for most kinds."""
        return self.spec.pretrain_epochs(self)

    def check_features(self, n_features: int) -> None:
        """Constraints that need the input width: an undercomplete kind's code must be narrower than the input."""
        if not self.spec.undercomplete:
            return
        wider = ", ".join(k for k, s in KINDS.items() if not s.undercomplete)
        if self.latent_dim != AUTO:
            _check(self.latent_dim < n_features, "model.latent_dim",
                   f"{self.latent_dim} must be < the {n_features} input features for kind {self.kind} "
                   f"(undercomplete); {wider} allow a wider code")
        if self.member_latent_dims != AUTO:
            _check(max(self.member_latent_dims) < n_features, "model.member_latent_dims",
                   f"{self.member_latent_dims}: each must be < the {n_features} input features for kind "
                   f"{self.kind} (undercomplete); {wider} allow a wider code")


def model_section() -> type:
    """SharedModelSection plus every registered kind's settings fields (same names, types and defaults).
    Built once on import; a kind registered later (a test's) needs `pipeline.config.ModelSection` rebuilt."""
    extra = []
    for spec in KINDS.values():
        hints = typing.get_type_hints(spec.settings)
        for f in dataclasses.fields(spec.settings):
            extra.append((f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory)))
    cls = dataclasses.make_dataclass("ModelSection", extra, bases=(SharedModelSection,))
    cls.__module__ = __name__  # pickled by reference (Ray ships configs to workers)
    cls.__doc__ = "The `model` section: the shared settings and, flat beside them, each kind's own."
    return cls


ModelSection = model_section()
