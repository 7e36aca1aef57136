"""The stacked model: layer-wise pretraining stages chosen by the epoch, then fine-tuning (the maths:
pipeline/kinds/stacked.py)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from pipeline.kinds.stacked import StackedSettings
from pipeline.models.base import Autoencoder, blocks


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
