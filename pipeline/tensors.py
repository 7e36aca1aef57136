"""Torch at the edge of the data: Arrow batches as tensors, input normalization, mixed precision.

The small torch helpers that training, validation and scoring all use; nothing here knows of Ray or of the
pipeline's other modules.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

# Arrow buffers are read-only; the tensors made from them are never written to, so the copy torch asks
# for is skipped (zero-copy is the point) and its warning silenced.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def arrow_to_tensor(table: pa.Table, column: str = "x") -> torch.Tensor:
    """The fixed_size_list<float32> column of an Arrow batch as a (rows, d) tensor, without copying."""
    arr = table.column(column)
    arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    d = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.reshape(-1, d))


def autocast_for(device: torch.device):
    """bf16 autocast on GPU (mixed precision); a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class Normalizer:
    """(x - mean) / scale with the stored statistics, on whatever device the model is on."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, device: torch.device | str = "cpu"):
        # copies: statistics can arrive as read-only arrays (from Ray's object store), which torch warns about
        self.mean = torch.tensor(np.array(mean, np.float32), device=device)
        self.inv_scale = 1.0 / torch.tensor(np.array(scale, np.float32), device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_scale
