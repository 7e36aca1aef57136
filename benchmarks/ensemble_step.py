"""The default ensemble's training step with its members stacked (pipeline/models/stack.py) against the same
members run one after another, the same model, batches and optimizer, one torch thread; the two sides alternate
round by round, so the machine's other work weighs on both alike.

    python -m benchmarks.ensemble_step                    # the default members on tables of 8 to 1,555 columns
    python -m benchmarks.ensemble_step --cases 8x16,100x512 --rounds 3

Prints, per case (columns x batch rows), the work (rows x the members' weights, against STACK_MAX_WORK, above
which the ensemble's training steps stay sequential; the stacked side here is timed either way) and the median
ms per step of each side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.models import build_model
from pipeline.models.stack import STACK_MAX_WORK, member_weights, stacked_recon_loss
from pipeline.sizing import AUTO_ENSEMBLE, auto_member_latents, auto_sizes
from pipeline.train import LossForward, make_optimizer, train_epoch

CASES = "8x16,30x64,16x256,10x1024,100x256,64x512,100x512,100x1024,1555x16"


class Stacked(torch.nn.Module):
    """The members' loss stacked whatever the step's size (the ensemble itself stacks only up to STACK_MAX_WORK)."""

    def __init__(self, ensemble: torch.nn.Module):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor):
        loss = stacked_recon_loss(self.ensemble.members, x)
        return loss, {"recon": loss.detach()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=CASES, help="columns x batch rows, comma-separated")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per side (the median is taken)")
    p.add_argument("--steps", type=int, default=200, help="steps per round and side")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for case in a.cases.split(","):
        d, rows = map(int, case.split("x"))
        hidden, latent = auto_sizes(d)
        model = build_model(d, ensemble=AUTO_ENSEMBLE, hidden_dims=hidden, latent_dim=latent,
                            member_latent_dims=auto_member_latents(d, AUTO_ENSEMBLE), score="calibrated")
        opt = make_optimizer(model.parameters(), 1e-3, 1e-5)
        batches = list(torch.randn(rows * 10, d, generator=torch.Generator().manual_seed(0)).split(rows))
        model.stacked = False
        sides = {False: LossForward(model), True: Stacked(model)}
        ms: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds):
            for stacked, loss in sides.items():
                train_epoch(batches[:1], loss, opt)  # warm-up
                epochs = max(1, a.steps // len(batches))
                t0 = time.perf_counter()
                for _ in range(epochs):
                    train_epoch(batches, loss, opt)
                ms[stacked].append(1e3 * (time.perf_counter() - t0) / (epochs * len(batches)))
        seq, stk = statistics.median(ms[False]), statistics.median(ms[True])
        work = rows * member_weights(model.members)
        path = "stacked" if work <= STACK_MAX_WORK else "sequential"
        print(f"{d:5d} columns, batch {rows:5d}: work {work / 1e6:7.2f} M ({path} in training)   "
              f"sequential {seq:7.2f} ms/step   stacked {stk:7.2f} ms/step   ratio {seq / stk:5.2f}", flush=True)


if __name__ == "__main__":
    main()
