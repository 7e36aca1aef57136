"""`kind: stacked`: greedy layer-wise pretraining, then end-to-end fine-tuning of the whole stack.

With encoder blocks e_1..e_L and decoder blocks d_L..d_1 (d_l mirrors e_l), stage l (l = 1..L) trains the
shallow autoencoder d_l(e_l(z)) to reconstruct z = e_{l-1}(...e_1(x)), the lower blocks frozen; each
stage lasts `pretrain_epochs` epochs. Then every epoch fine-tunes the full model on MSE. The stage is a
function of the epoch, so a run resumed from a checkpoint picks up in the right stage.
The model: pipeline/models/stacked.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec
from pipeline.sizing import AUTO


@dataclass(frozen=True)
class StackedSettings:
    pretrain_epochs: int = 2
    """stacked: epochs of greedy pretraining per layer pair before end-to-end fine-tuning."""

    def __post_init__(self) -> None:
        check_config(self.pretrain_epochs >= 1, "model.pretrain_epochs", f"{self.pretrain_epochs} must be >= 1")


def check(m: Any) -> None:
    check_config(m.hidden_dims == AUTO or len(m.hidden_dims) >= 1, "model.hidden_dims",
                 "stacked needs at least one hidden layer to pretrain layer by layer")


def pretrain_epochs(m: Any) -> int:
    """One stage of `pretrain_epochs` per layer pair (hidden layers + the code) before fine-tuning."""
    layers = 1 if m.hidden_dims == AUTO else len(m.hidden_dims)  # auto sizes give one hidden layer
    return m.pretrain_epochs * (layers + 1)


# a pretraining stage trains one layer pair: DDP must expect the other parameters to get no gradient
SPEC = KindSpec("stacked", StackedSettings, undercomplete=True, find_unused_parameters=True,
                check=check, pretrain_epochs=pretrain_epochs)
