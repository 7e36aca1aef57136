"""`kind: sparse`: a penalty that keeps most code units near zero, so the code may be overcomplete.

l1: weight * mean |h| over rows and units (code activation relu by default: units can be exactly 0).
kl: weight * sum_j KL(rho || rho_j), rho_j the batch-mean activation of unit j in (0, 1) (sigmoid code).
The model: pipeline/models/sparse.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec


@dataclass(frozen=True)
class SparseSettings:
    sparsity: Literal["l1", "kl"] = "l1"
    """sparse: penalty on the code; l1 on |h|, or KL from sparsity_target to each unit's mean activation."""
    sparsity_weight: float = 1e-3
    """sparse: weight of the sparsity penalty in the loss."""
    sparsity_target: float = 0.05
    """sparse (kl): target mean activation of each code unit, in (0, 1)."""

    def __post_init__(self) -> None:
        check_config(self.sparsity_weight >= 0, "model.sparsity_weight", f"{self.sparsity_weight} must be >= 0")
        check_config(0.0 < self.sparsity_target < 1.0, "model.sparsity_target",
                     f"{self.sparsity_target} must be in (0, 1)")


def check(m: Any) -> None:
    if m.sparsity == "kl":
        check_config(m.code_activation in (None, "sigmoid"), "model.code_activation",
                     f"{m.code_activation}: the kl sparsity penalty needs codes in (0, 1); use sigmoid or unset")


SPEC = KindSpec("sparse", SparseSettings, check=check)
