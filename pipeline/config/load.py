"""Reading a config: YAML and dotted `--set key=value` overrides into one tree, and the tree into typed,
checked dataclasses. Knows nothing of the sections themselves (pipeline/config/__init__.py names them).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.errors import ConfigError


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
        if words and len(errors) == 2:  # a number or list, or a word like `auto`: the number's message
            raise ConfigError(f"{errors[0] if typing.get_origin(args[0]) is not Literal else errors[1]} "
                              f"(or {', '.join(map(str, words))})")
        raise ConfigError(f"config {key}: {value!r} is not a valid value ({_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config {key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise ConfigError(f"config {key}: unsupported type {tp}")  # pragma: no cover - a bug, not user input


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def build(cls: type, raw: Any, prefix: str) -> Any:
    """`cls` (a dataclass) from the mapping `raw`, every value checked against its annotation; `prefix`: the
    dotted key of `raw`, for messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"config {where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value parsed as YAML (so `[64,32]`, `true`, `1e-3` work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} as YAML ({e.__class__.__name__})") from None
    return key, value


MOVED = {"train.stall_timeout_s": "run.stall_timeout_s", "score.threshold_quantile": "train.threshold_quantile"}
"""Keys that moved to the section of their reader: old dotted key -> new one. The old key still loads, with one
warning line; given both, the new key wins."""


def _move_renamed(tree: dict[str, Any]) -> None:
    for old, new in MOVED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = tree.get(osec)
        if not isinstance(section, dict) or okey not in section:
            continue
        value = section.pop(okey)
        print(f"warning: config {old} is now {new} (the old key still loads; rename it)", file=sys.stderr,
              flush=True)
        target = tree.setdefault(nsec, {})
        if isinstance(target, dict):
            target.setdefault(nkey, value)


def read_tree(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML at `path` (or an empty tree) with the dotted overrides applied, not yet checked; keys that
    moved (MOVED) are read at their new place."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p}{where}: invalid YAML") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    _move_renamed(tree)
    return tree
