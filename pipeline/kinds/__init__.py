"""The model kinds (`model.kind`): each kind's settings, checks and hooks, one module each, registered here.
Loads without torch: the config reads it; the model classes live in `pipeline/models/`.

    dense        undercomplete MLP; the bottleneck is the only constraint (linear + MSE: the PCA subspace)
    denoising    reconstructs the clean x from a corrupted one (Gaussian or masking noise)
    sparse       L1 or KL(target || mean activation) penalty on the code; may be overcomplete
    contractive  penalty on ||df/dx||_F^2, the encoder Jacobian, computed in closed form for the MLP
    variational  Gaussian q(h|x) and p(x|h); loss = -ELBO with a weighted KL term
    stacked      greedy layer-wise pretraining, then end-to-end fine-tuning (stage chosen by the epoch)

To add a kind: write `pipeline/kinds/<name>.py` with its settings dataclass and `SPEC = KindSpec(...)` (see
pipeline/kinds/spec.py; no torch there) and `pipeline/models/<name>.py` with its Autoencoder subclass, and
add one `register(...)` line below and one entry to `pipeline.models.MODELS`. Its settings become flat
`model.<setting>` config keys (typed and range-checked), the config checks its scores and learning rules
against the spec, training uses its hooks, and the model manifest rebuilds it; only the model classes and
the recirculation rule differ in code. Document its keys in the README's kinds table.
"""

from __future__ import annotations

from pipeline.kinds import contractive, dense, denoising, sparse, stacked, variational
from pipeline.kinds.spec import MLP_SETTINGS, KindSpec

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


def kinds_with(attribute: str, value: str) -> list[str]:
    """The kinds whose spec lists `value` in `attribute` (`scores`, `algorithms`), for error messages."""
    return [k for k, s in KINDS.items() if value in getattr(s, attribute)]
