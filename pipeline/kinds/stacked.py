"""`kind: stacked`: greedy layer-wise pretraining, then end-to-end fine-tuning of the whole stack.

With encoder blocks e_1..e_L and decoder blocks d_L..d_1 (d_l mirrors e_l), stage l (l = 1..L) trains the
shallow autoencoder d_l(e_l(z)) to reconstruct z = e_{l-1}(...e_1(x)), the lower blocks frozen; each
stage lasts `pretrain_epochs` epochs. Then every epoch fine-tunes the full model on MSE. The stage is a
function of the epoch, so a run resumed from a checkpoint picks up in the right stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline.errors import check_config
from pipeline.kinds.spec import KindSpec
from pipeline.models import AUTO, Autoencoder, blocks


@dataclass(frozen=True)
class StackedSettings:
    pretrain_epochs: int = 2
    """stacked: epochs of greedy pretraining per layer pair before end-to-end fine-tuning."""

    def __post_init__(self) -> None:
        check_config(self.pretrain_epochs >= 1, "model.pretrain_epochs", f"{self.pretrain_epochs} must be >= 1")


class StackedAutoencoder(Autoencoder):
    settings: StackedSettings

    def __init__(self, n_features: int, settings: StackedSettings = StackedSettings(), **mlp: Any):
        super().__init__(n_features, settings=settings, **mlp)
        # tuples, so nn.Module does not register these views of encoder/decoder a second time
        self.enc_blocks = tuple(blocks(self.encoder))
        self.dec_blocks = tuple(blocks(self.decoder))
        self.stage = self.n_layers  # fine-tuning unless the training loop says otherwise

    @property
    def pretrain_epochs(self) -> int:
        return self.settings.pretrain_epochs

    @property
    def n_layers(self) -> int:
        return len(self.enc_blocks)

    def stage_at(self, epoch: int) -> int:
        """0-based layer being pretrained at `epoch`, or n_layers when fine-tuning."""
        return min(epoch // self.pretrain_epochs, self.n_layers)

    def stage_name(self, stage: int) -> str:
        return "finetune" if stage >= self.n_layers else f"pretrain-{stage + 1}/{self.n_layers}"

    def begin_epoch(self, epoch: int) -> Optional[str]:
        super().begin_epoch(epoch)  # the calibrated score's statistics start afresh
        self.stage = self.stage_at(epoch)
        return self.stage_name(self.stage)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage >= self.n_layers:
            return super().loss(x)
        l = self.stage
        with torch.no_grad():  # the blocks below are frozen: their output is this stage's data
            z = x
            for b in self.enc_blocks[:l]:
                z = b(z)
        h = self.enc_blocks[l](z)
        if l == self.n_layers - 1:
            h = self.code_act(h)
        recon = self.dec_blocks[self.n_layers - 1 - l](h)
        mse = torch.mean((recon.float() - z.float()) ** 2)
        return mse, {"recon": mse.detach()}


def check(m: Any) -> None:
    check_config(m.hidden_dims == AUTO or len(m.hidden_dims) >= 1, "model.hidden_dims",
                 "stacked needs at least one hidden layer to pretrain layer by layer")


def pretrain_epochs(m: Any) -> int:
    """One stage of `pretrain_epochs` per layer pair (hidden layers + the code) before fine-tuning."""
    layers = 1 if m.hidden_dims == AUTO else len(m.hidden_dims)  # auto sizes give one hidden layer
    return m.pretrain_epochs * (layers + 1)


# a pretraining stage trains one layer pair: DDP must expect the other parameters to get no gradient
SPEC = KindSpec("stacked", StackedAutoencoder, StackedSettings, undercomplete=True, find_unused_parameters=True,
                check=check, pretrain_epochs=pretrain_epochs)
