"""The model kinds (`model.kind`), one module each, registered here; `build_model` builds any of them.

    dense        undercomplete MLP; the bottleneck is the only constraint (linear + MSE: the PCA subspace)
    denoising    reconstructs the clean x from a corrupted one (Gaussian or masking noise)
    sparse       L1 or KL(target || mean activation) penalty on the code; may be overcomplete
    contractive  penalty on ||df/dx||_F^2, the encoder Jacobian, computed in closed form for the MLP
    variational  Gaussian q(h|x) and p(x|h); loss = -ELBO with a weighted KL term
    stacked      greedy layer-wise pretraining, then end-to-end fine-tuning (stage chosen by the epoch)

To add a kind: write `pipeline/kinds/<name>.py` with its settings dataclass, its Autoencoder subclass and
`SPEC = KindSpec(...)` (see pipeline/kinds/spec.py), and add one `register(...)` line below. Its settings
become flat `model.<setting>` config keys (typed and range-checked), training uses its hooks, and the model
manifest rebuilds it; nothing else branches on the kind. Document its keys in the README's kinds table.
"""

from __future__ import annotations

from typing import Any, Optional

from pipeline.kinds import contractive, dense, denoising, sparse, stacked, variational
from pipeline.kinds.spec import KindSpec
from pipeline.models import AUTO, MLP_SETTINGS, Autoencoder, Ensemble, SlotLayout

KINDS: dict[str, KindSpec] = {}
"""`model.kind` -> its spec, in registration order (dense, the default, first)."""


def register(spec: KindSpec) -> KindSpec:
    """Add a kind; its setting names must not clash with the shared MLP settings or another kind's."""
    if spec.name in KINDS:
        raise ValueError(f"model kind {spec.name!r} is registered twice")
    taken = {name: other.name for other in KINDS.values() for name in other.setting_names}
    taken.update({name: "every kind" for name in (*MLP_SETTINGS, "kind")})
    for name in spec.setting_names:
        if name in taken:
            raise ValueError(f"model kind {spec.name!r}: setting {name!r} is already one of {taken[name]}'s")
    KINDS[spec.name] = spec
    return spec


register(dense.SPEC)
register(denoising.SPEC)
register(sparse.SPEC)
register(contractive.SPEC)
register(variational.SPEC)
register(stacked.SPEC)


def spec_of(kind: str) -> KindSpec:
    if kind not in KINDS:
        raise ValueError(f"model.kind {kind!r} is not available (have: {', '.join(KINDS)})")
    return KINDS[kind]


def kind_setting_names() -> set[str]:
    """Every registered kind's own setting names (the flat `model.<setting>` keys besides the shared ones)."""
    return {name for spec in KINDS.values() for name in spec.setting_names}


def build_model(n_features: int, kind: str = "dense", layout: Optional[SlotLayout] = None, ensemble: int | str = 1,
                **settings: Any) -> Autoencoder | Ensemble:
    """The autoencoder named by `kind`, from a flat model section (`dataclasses.asdict(cfg.model)`, or a
    manifest's `model`); with `ensemble` > 1, that many of them in one `Ensemble`, member i with code width
    `member_latent_dims[i]` when given. Another kind's settings
    are skipped; a name no kind declares is an error, so no setting is ever dropped silently. `layout`: the
    input's columns (pipeline/features.py; None: numeric)."""
    if ensemble == AUTO:  # a section no job resolved (sizing.resolve_model picks the count): one model
        ensemble = 1
    members = settings.pop("member_latent_dims", AUTO)  # each member's code width (a manifest before: alike)
    if ensemble > 1:
        widths = [settings.get("latent_dim", AUTO)] * ensemble if members == AUTO else members
        return Ensemble([build_model(n_features, kind, layout, **{**settings, "latent_dim": w}) for w in widths])
    spec = spec_of(kind)
    if AUTO in (settings.get("latent_dim"), settings.get("hidden_dims")):  # sizes not chosen by a job yet
        from pipeline.sizing import auto_sizes  # noqa: PLC0415 - sizing imports the config module

        chosen = dict(zip(("hidden_dims", "latent_dim"), auto_sizes(n_features)))
        settings = {k: chosen[k] if v == AUTO and k in chosen else v for k, v in settings.items()}
    unknown = set(settings) - set(MLP_SETTINGS) - kind_setting_names()
    if unknown:
        raise ValueError(f"model settings {', '.join(sorted(unknown))}: declared by no model kind "
                         f"(have: {', '.join(KINDS)})")
    shared = {k: settings[k] for k in MLP_SETTINGS if k in settings}
    return spec.model(n_features, settings=spec.settings_from(settings), layout=layout, **shared)
