"""`kind: dense`: the undercomplete MLP autoencoder; the bottleneck is the only constraint (linear + MSE: the
PCA subspace). Its model is `pipeline.models.base.Autoencoder`, the base every other kind extends; the only
kind recirculation trains (one hidden layer, pipeline/recirculation.py)."""

from __future__ import annotations

from pipeline.kinds.spec import KindSpec

SPEC = KindSpec("dense", undercomplete=True, algorithms=("backprop", "recirculation"))
