"""Per-column errors on categorical inputs: one training step (forward, loss, backward, update) with the model's
errors (pipeline/layout.py: one gather and log-softmax per width of column) against one cross-entropy call per
column (what the layout did before), the same model and batch, in the same run, one torch thread.

    python -m benchmarks.column_errors            # a table each: wide boolean flags, a mixed table, a wide one

Prints ms per step for both and their ratio (baseline / pipeline: above 1 is faster).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.layout import SlotLayout
from pipeline.models import build_model

# (name, numeric columns, categorical columns' widths (levels + other + missing), rows per batch)
CASES = (
    ("1,545 boolean flags (batch 16)", 10, (4,) * 1545, 16),
    ("1,545 boolean flags (batch 256)", 10, (4,) * 1545, 256),
    ("40 categoricals of 8 levels", 6, (10,) * 40, 256),
    ("the demo's shape: 6 numeric, 5 categoricals", 6, (7, 6, 5, 66, 4), 4096),
)


def layout(numeric: int, widths: tuple[int, ...]) -> tuple[SlotLayout, int]:
    groups, a = [], numeric
    for col, w in enumerate(widths):
        groups.append((a, a + w, numeric + col))
        a += w
    return SlotLayout(numeric + len(widths), tuple((i, i) for i in range(numeric)), tuple(groups)), a


def per_column_loop(lay: SlotLayout, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The baseline: one cross-entropy call per categorical column."""
    out = recon.new_zeros(recon.shape[0], lay.n_columns)
    slots = torch.tensor([s for s, _ in lay.numeric])
    out[:, slots] = (recon[:, slots] - x[:, slots]) ** 2
    ce = [F.cross_entropy(recon[:, a:b], x[:, a:b].argmax(dim=1), reduction="none") for a, b, _ in lay.groups]
    return out.index_add(1, torch.tensor([c for _, _, c in lay.groups]), torch.stack(ce, dim=1))


def ms_per_step(step, seconds: float) -> float:
    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0, help="per side and case")
    a = p.parse_args()
    torch.set_num_threads(1)
    for name, numeric, widths, rows in CASES:
        lay, width = layout(numeric, widths)
        model = build_model(width, hidden_dims=[64], latent_dim=16, layout=lay)
        g = torch.Generator().manual_seed(0)
        x = torch.zeros(rows, width)
        x[:, :numeric] = torch.randn(rows, numeric, generator=g)
        for s, e, _ in lay.groups:
            x[torch.arange(rows), s + torch.randint(0, e - s, (rows,), generator=g)] = 1.0
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(errors):
            opt.zero_grad()
            errors(model(x), x).mean().backward()
            opt.step()

        ours = ms_per_step(lambda: step(model.column_errors), a.seconds)
        base = ms_per_step(lambda: step(lambda r, xx: per_column_loop(lay, r, xx)), a.seconds)
        print(f"{name:45s} pipeline {ours:7.1f} ms/step   per-column loop {base:7.1f} ms/step   "
              f"ratio {base / ours:5.1f}", flush=True)


if __name__ == "__main__":
    main()
