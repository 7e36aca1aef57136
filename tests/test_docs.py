"""The README's tables against the code they describe, so the two cannot drift: the config-key table against
the config dataclasses (every key, both ways, with its default) and the output-schema tables against
`pipeline.output.output_schema`."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pytest
import yaml

from pipeline.config import Config, OutputSection
from pipeline.output import output_schema

README = Path(__file__).resolve().parents[1] / "README.md"
UNSET = object()


def readme_table(heading: str) -> list[list[str]]:
    """Rows (cells, stripped) of the first Markdown table under `heading`."""
    lines = README.read_text().splitlines()
    start = lines.index(heading)
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif seen or line.startswith("#"):
            break
    return rows[1:]  # the header row


def first_code(cell: str) -> str:
    m = re.search(r"`([^`]*)`", cell)
    return m.group(1) if m else cell


def config_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, default) of every setting, walking nested config dataclasses whatever their depth."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], key + ".")
            continue
        if f.default is not dataclasses.MISSING:
            yield key, f.default
        elif f.default_factory is not dataclasses.MISSING:
            yield key, f.default_factory()
        else:
            yield key, UNSET


def readme_default(cell: str) -> Any:
    if cell == "unset":
        return None
    return yaml.safe_load(cell.strip("`"))


def same_default(doc: Any, code: Any) -> bool:
    if isinstance(code, bool) or not isinstance(code, (int, float)):
        return doc == code
    return isinstance(doc, (int, float)) and not isinstance(doc, bool) and float(doc) == float(code)


def test_readme_config_table_lists_every_key_with_its_default():
    rows = {first_code(r[0]): r[1] for r in readme_table("## Config keys")}
    code = dict(config_keys())
    assert sorted(set(code) - set(rows)) == [], "config keys missing from the README's table"
    assert sorted(set(rows) - set(code)) == [], "README keys that no config dataclass declares"
    wrong = {k: (rows[k], code[k]) for k in code if not same_default(readme_default(rows[k]), code[k])}
    assert wrong == {}, "README default (left) differs from the dataclass default (right)"


def type_name(t: pa.DataType) -> str:
    """The README's spelling of an Arrow type."""
    if pa.types.is_list(t):
        return f"list<{type_name(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, {t.tz}]"
    return {pa.float32(): "float32", pa.bool_(): "bool", pa.string(): "string"}.get(t, str(t))


EVERY_OPTION = OutputSection(flat_latent=True, feature_errors=True, top_k_features=3)
FLAT = "z_0 … z_{k-1}"


def documented_columns() -> list[tuple[str, str]]:
    """`output_schema` with every optional column on, as (README name, README type); the id columns are one
    row (their type is the input's) and the flat latent columns one row."""
    out = []
    for f in output_schema([pa.field("id", pa.int64())], 2, EVERY_OPTION):
        if f.name == "id":
            out.append(("id", "as in the input"))
        elif f.name.startswith("z_"):
            if f.name == "z_0":
                out.append((FLAT, type_name(f.type)))
        else:
            out.append((f.name, type_name(f.type)))
    return out


@pytest.mark.parametrize("heading", ["### Output schema", "### Feature-store ingestion"])
def test_readme_output_tables_match_the_declared_schema(heading):
    got = []
    for cells in readme_table(heading):
        name = "id" if "id columns" in cells[0] or cells[0].startswith("`id`") else first_code(cells[0])
        got.append((name, "as in the input" if name == "id" else first_code(cells[1])))
    assert got == documented_columns()


def test_output_schema_follows_the_output_settings():
    ids = [pa.field("user", pa.string()), pa.field("n", pa.int32())]
    plain = output_schema(ids, 4, OutputSection())
    assert plain.names == ["user", "n", "latent", "recon_error", "is_anomaly", "model_version", "event_timestamp",
                           "scored_at"]
    assert plain.field("user").type == pa.string() and plain.field("n").type == pa.int32()
    full = output_schema(ids, 4, EVERY_OPTION)
    assert full.names[3:7] == ["z_0", "z_1", "z_2", "z_3"]
    assert set(full.names) - set(plain.names) == {"z_0", "z_1", "z_2", "z_3", "feature_errors", "top_features"}
