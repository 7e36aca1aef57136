"""The autoencoders, in plain PyTorch (no Ray): the shared base (`base.py`), one module per kind that needs
its own class, the ensemble's members run as one batched network (`stack.py`), and `build_model`, which builds
any kind from a flat model section.

    build_model(n_features, kind=..., ensemble=..., **settings) -> Autoencoder | Ensemble

`MODELS` maps each `model.kind` to its class; the kind's settings, checks and hooks are its spec in
`pipeline/kinds/` (loaded without torch).
"""

from __future__ import annotations

from typing import Any, Optional

from pipeline.kinds import KINDS, kind_setting_names, spec_of
from pipeline.kinds.spec import CODE_SPACE_SETTINGS, MLP_SETTINGS
from pipeline.layout import SlotLayout
from pipeline.models.base import (ACTIVATIONS, Autoencoder, Ensemble, activation_and_slope, attach_subspace, blocks,
                                  linear_layers, mlp)
from pipeline.models.contractive import ContractiveAutoencoder
from pipeline.models.denoising import DenoisingAutoencoder
from pipeline.models.sparse import SparseAutoencoder
from pipeline.models.stacked import StackedAutoencoder
from pipeline.models.variational import VariationalAutoencoder
from pipeline.sizing import AUTO, auto_sizes

__all__ = ["ACTIVATIONS", "MLP_SETTINGS", "MODELS", "Autoencoder", "Ensemble", "SlotLayout", "activation_and_slope",
           "blocks", "build_model", "linear_layers", "mlp"]

MODELS: dict[str, type[Autoencoder]] = {
    "dense": Autoencoder,
    "denoising": DenoisingAutoencoder,
    "sparse": SparseAutoencoder,
    "contractive": ContractiveAutoencoder,
    "variational": VariationalAutoencoder,
    "stacked": StackedAutoencoder,
}
"""`model.kind` -> its model class, built as `cls(n_features, settings=<kind settings>, **<MLP settings>)`."""


def build_model(n_features: int, kind: str = "dense", layout: Optional[SlotLayout] = None, ensemble: int | str = 1,
                **settings: Any) -> Autoencoder | Ensemble:
    """The autoencoder named by `kind`, from a flat model section (`dataclasses.asdict(cfg.model)`, or a
    manifest's `model`); with `ensemble` > 1, that many of them in one `Ensemble`, member i with code width
    `member_latent_dims[i]` when given. Another kind's settings are skipped; a name no kind declares is an
    error, so no setting is ever dropped silently. Sizes left `auto` (or not given) get pipeline/sizing.py's
    rules. `layout`: the input's columns (pipeline/featurizer.py; None: numeric)."""
    for k in CODE_SPACE_SETTINGS:  # how the emitted code is aligned (pipeline/alignment.py), not the network
        settings.pop(k, None)
    if ensemble == AUTO:  # a section no job resolved (sizing.resolve_model picks the count): one model
        ensemble = 1
    members = settings.pop("member_latent_dims", AUTO)  # each member's code width; none given: all alike
    subspace_weight = settings.pop("subspace_weight", 0.0)  # a term of the whole model's score, not a member's
    if ensemble > 1:
        widths = [settings.get("latent_dim", AUTO)] * ensemble if members == AUTO else members
        model = Ensemble([_build_one(n_features, kind, layout, {**settings, "latent_dim": w}) for w in widths])
    else:
        model = _build_one(n_features, kind, layout, settings)
    return attach_subspace(model, subspace_weight)


def _build_one(n_features: int, kind: str, layout: Optional[SlotLayout], settings: dict[str, Any]) -> Autoencoder:
    spec = spec_of(kind)
    settings = {"hidden_dims": AUTO, "latent_dim": AUTO, **settings}
    if AUTO in (settings["latent_dim"], settings["hidden_dims"]):  # sizes not chosen by a job yet
        chosen = dict(zip(("hidden_dims", "latent_dim"), auto_sizes(n_features)))
        settings = {k: chosen[k] if v == AUTO and k in chosen else v for k, v in settings.items()}
    unknown = set(settings) - set(MLP_SETTINGS) - kind_setting_names()
    if unknown:
        raise ValueError(f"model settings {', '.join(sorted(unknown))}: declared by no model kind "
                         f"(have: {', '.join(KINDS)})")
    shared = {k: settings[k] for k in MLP_SETTINGS if k in settings}
    return MODELS[kind](n_features, settings=spec.settings_from(settings), layout=layout, **shared)
