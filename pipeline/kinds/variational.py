"""`kind: variational`: q(h|x) = N(mu(x), diag exp(logvar(x))), p(h) = N(0, I), p(x|h) = N(g(h), diag s^2).

loss = mean over rows of  -E_q[log p(x|h)] + kl_weight * KL(q(h|x) || p(h))  (one reparameterized sample);
s^2 is a learned per-feature variance. latent(x) is mu(x). score is the squared reconstruction error of
g(mu(x)) (`score: recon`), its calibrated form (`score: calibrated`, the default for every kind), or the
negative ELBO with its likelihood term taken at h = mu(x) (`score: elbo`): all deterministic, so a row always
gets the same score.
The model: pipeline/models/variational.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import check_config
from pipeline.kinds.spec import SCORES, KindSpec


@dataclass(frozen=True)
class VariationalSettings:
    kl_weight: float = 1.0
    """variational: weight of KL(q(h|x) || N(0, I)) in the negative ELBO (1 is the true ELBO; beta-VAE)."""

    def __post_init__(self) -> None:
        check_config(self.kl_weight > 0, "model.kl_weight", f"{self.kl_weight} must be > 0")


def check(m: Any) -> None:
    check_config(m.code_activation in (None, "linear"), "model.code_activation",
                 "a variational code is a Gaussian mean; leave it unset")


SPEC = KindSpec("variational", VariationalSettings, check=check, categorical=False,
                scores=(*SCORES, "elbo"))
