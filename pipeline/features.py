"""Feature vectors as the models see them: normalized with the training statistics stored in the manifest.

Training and scoring both use this; scoring needs nothing from pipeline.train.
"""

from __future__ import annotations

import numpy as np
import torch


class Normalizer:
    """(x - mean) / scale with the stored statistics, on whatever device the model is on."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, device: torch.device | str = "cpu"):
        # copies: statistics can arrive as read-only arrays (from Ray's object store), which torch warns about
        self.mean = torch.tensor(np.array(mean, np.float32), device=device)
        self.inv_scale = 1.0 / torch.tensor(np.array(scale, np.float32), device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_scale
