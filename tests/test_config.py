"""Config: YAML + dotted overrides into typed sections; every mistake names its key."""

from __future__ import annotations

import pytest

from pipeline.config import Config, load_config, parse_override
from pipeline.errors import ConfigError

DEMO = "jobs/configs/demo.yaml"


def test_demo_config_loads_with_types():
    cfg = load_config(DEMO)
    assert isinstance(cfg, Config)
    assert cfg.run.name == "demo"
    assert cfg.train.cpus_per_worker == 0.5 and isinstance(cfg.train.cpus_per_worker, float)
    assert cfg.run_uri.endswith("artifacts/demo")


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(DEMO, ["train.epochs=5", "model.hidden_dims=[64,32,16]", "train.use_gpu=true",
                             "train.lr=1e-2", "data.features=[a, b, c]", "storage.endpoint_url=http://h:1"])
    assert cfg.train.epochs == 5
    assert cfg.model.hidden_dims == [64, 32, 16]
    assert cfg.train.use_gpu is True
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.data.features == ["a", "b", "c"] and not cfg.data.vector_column
    assert cfg.storage.endpoint_url == "http://h:1"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config(None, ["train.epochs=2.5"])


@pytest.mark.parametrize("override, key", [
    ("train.epochz=3", "train.epochz: unknown key"),
    ("nosuch.section=1", "nosuch: unknown key"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=many", "train.epochs: expected an integer"),
    ("train.use_gpu=maybe", "train.use_gpu: expected true or false"),
    ("model.kind=transformer", "model.kind: 'transformer' is not one of"),
    ("model.hidden_dims=[64, -1]", "model.hidden_dims"),
    ("data.validation_fraction=1.5", "data.validation_fraction"),
    ("data.nan_policy=ignore", "data.nan_policy"),
    ("train.threshold_quantile=1", "train.threshold_quantile"),
    ("run.name=bad/name", "run.name"),
    ("storage.endpoint_url=localhost:9000", "storage.endpoint_url"),
    ("train=5", "train: expected a mapping"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    msg = str(e.value)
    assert key in msg
    assert "\n" not in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="train.epochs"):
        parse_override("train.epochs=[1,")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_every_field_has_a_docstring():
    """Fields are documented where they are declared (tests/test_docs.py checks docs/configuration.md's key table
    against the same dataclasses: every key, with its default)."""
    import ast
    import dataclasses
    import inspect

    import pipeline.config as mod
    import pipeline.config.model
    import pipeline.config.sections
    import pipeline.config.training
    from pipeline.kinds import KINDS

    kind_modules = {inspect.getmodule(spec.settings) for spec in KINDS.values()}
    config_modules = (mod, pipeline.config.model, pipeline.config.sections, pipeline.config.training)
    classes = [node for m in (*config_modules, *kind_modules) for node in ast.parse(inspect.getsource(m)).body
               if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list)]
    # ModelSection is assembled from the kinds' settings (make_dataclass), so it has no class statement
    sections = {c.name for c in classes} | {n for n, v in vars(mod).items() if dataclasses.is_dataclass(v)}
    missing = []
    for node in classes:  # a field holding a nested section is documented by that section's fields
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and ast.unparse(stmt.annotation) not in sections:
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                    missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, f"fields without a docstring: {missing}"


def test_moved_keys_still_load_at_their_new_place_with_one_warning(capsys):
    cfg = load_config(DEMO, ["train.stall_timeout_s=20", "score.threshold_quantile=0.95"])
    assert cfg.run.stall_timeout_s == 20 and cfg.train.threshold_quantile == 0.95
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: config train.stall_timeout_s is now run.stall_timeout_s (the old key still loads; "
                   "rename it)",
                   "warning: config score.threshold_quantile is now train.threshold_quantile (the old key still "
                   "loads; rename it)"]
    new = load_config(DEMO, ["score.threshold_quantile=0.95", "train.threshold_quantile=0.9"])
    assert new.train.threshold_quantile == 0.9  # given both, the new key wins


def test_the_demo_trains_the_model_a_user_who_sets_only_the_input_gets():
    """`make run` shows the defaults' model: the demo config sets no model size, epochs, learning rate or batch."""
    demo, defaults = load_config(DEMO), Config()
    assert demo.model == defaults.model
    for key in ("epochs", "steps", "batch_size", "lr", "weight_decay", "trim_fraction", "threshold_quantile"):
        assert getattr(demo.train, key) == getattr(defaults.train, key), key
