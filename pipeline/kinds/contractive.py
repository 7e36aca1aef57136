"""`kind: contractive`: MSE + weight * mean over rows of ||dh/dx||_F^2, the encoder Jacobian's squared norm,
computed in closed form for the MLP (pipeline/models/contractive.py)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec


@dataclass(frozen=True)
class ContractiveSettings:
    contractive_weight: float = 1e-3
    """contractive: weight of the mean squared Frobenius norm of the encoder Jacobian."""

    def __post_init__(self) -> None:
        check_config(self.contractive_weight >= 0, "model.contractive_weight",
                     f"{self.contractive_weight} must be >= 0")


SPEC = KindSpec("contractive", ContractiveSettings)
