"""`kind: dense`: the undercomplete MLP autoencoder; the bottleneck is the only constraint (linear + MSE: the
PCA subspace). The model class is `pipeline.models.Autoencoder`, the base every other kind extends."""

from __future__ import annotations

from pipeline.kinds.spec import KindSpec
from pipeline.models import Autoencoder

SPEC = KindSpec("dense", Autoencoder, undercomplete=True)
