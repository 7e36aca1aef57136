"""Feature vectors as the models see them: normalized with the training statistics stored in the manifest.

Training and scoring both use this; scoring needs nothing from pipeline.train.
"""

from __future__ import annotations

import numpy as np
import torch


class Normalizer:
    """(x - mean) / scale with the stored statistics, on whatever device the model is on."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, device: torch.device | str = "cpu"):
        self.mean = torch.as_tensor(np.asarray(mean, np.float32), device=device)
        self.inv_scale = 1.0 / torch.as_tensor(np.asarray(scale, np.float32), device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_scale
