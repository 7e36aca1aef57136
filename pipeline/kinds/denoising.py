"""`kind: denoising`: learns to map a corrupted x~ back to the clean x; scored on clean input.

Gaussian noise adds noise_level * N(0, 1) to each (normalized) feature; masking noise sets each feature to
0, its training mean, with probability noise_level. The model: pipeline/models/denoising.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec


@dataclass(frozen=True)
class DenoisingSettings:
    noise: Literal["gaussian", "mask"] = "gaussian"
    """denoising: corruption; gaussian adds noise_level * N(0,1), mask zeroes features with p = noise_level."""
    noise_level: float = 0.2
    """denoising: noise std in normalized units (gaussian) or share of features masked (mask, < 1)."""

    def __post_init__(self) -> None:
        check_config(self.noise_level > 0, "model.noise_level", f"{self.noise_level} must be > 0")
        if self.noise == "mask":
            check_config(self.noise_level < 1, "model.noise_level", f"{self.noise_level} must be < 1 for mask noise")


SPEC = KindSpec("denoising", DenoisingSettings)
