"""The docs (README.md and docs/*.md) against the code they describe, so the two cannot drift.

Checked here: the full config-key table (docs/configuration.md) against the config dataclasses, every key both
ways with its default, and the README's short key table against the same defaults; the output-schema tables
(README, docs/operations.md) against `pipeline.score.output_schema`; the kinds and learning-rule tables
(docs/model-kinds.md) against the registered kinds and `train.algorithm`'s values; the measured tables of
docs/evaluation.md, docs/performance.md and docs/scale.md present with every row they report; every relative
link (file and heading) resolving, every docs page linked from the README, every repository path and test
named existing; and no source file named in the README, which is the user's guide.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pytest
import yaml

from pipeline.config import Config, OutputSection, TrainSection
from pipeline.kinds import KINDS
from pipeline.output import output_schema

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
UNSET = object()


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def md_table(path: Path, heading: str) -> list[list[str]]:
    """Rows (cells, stripped) of the first Markdown table under `heading` in `path`, header row left out."""
    lines = path.read_text().splitlines()
    assert heading in lines, f"{path.relative_to(ROOT)} has no heading {heading!r}"
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
    assert rows, f"no table under {heading!r} in {path.relative_to(ROOT)}"
    return rows[1:]


def md_table_header(path: Path, heading: str) -> list[str]:
    lines = path.read_text().splitlines()
    header = next(line for line in lines[lines.index(heading) + 1:] if line.startswith("|"))
    return [c.strip() for c in header.strip().split("|")[1:-1]]


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


def doc_default(cell: str) -> Any:
    if cell == "unset":
        return None
    return yaml.safe_load(cell.strip("`"))


def same_default(doc: Any, code: Any) -> bool:
    if isinstance(code, bool) or not isinstance(code, (int, float)):
        return doc == code
    return isinstance(doc, (int, float)) and not isinstance(doc, bool) and float(doc) == float(code)


def test_config_table_lists_every_key_with_its_default():
    rows = {first_code(r[0]): r[1] for r in md_table(DOCS / "configuration.md", "## Config keys")}
    code = dict(config_keys())
    assert sorted(set(code) - set(rows)) == [], "config keys missing from docs/configuration.md's table"
    assert sorted(set(rows) - set(code)) == [], "docs/configuration.md keys that no config dataclass declares"
    wrong = {k: (rows[k], code[k]) for k in code if not same_default(doc_default(rows[k]), code[k])}
    assert wrong == {}, "documented default (left) differs from the dataclass default (right)"


def test_readme_key_table_names_real_keys_with_their_defaults():
    rows = {first_code(r[0]): r[1] for r in md_table(README, "## Configuration")}
    code = dict(config_keys())
    assert len(rows) >= 10, "the README's table of common keys is (nearly) empty"
    assert sorted(set(rows) - set(code)) == [], "README keys that no config dataclass declares"
    wrong = {k: (rows[k], code[k]) for k in rows if not same_default(doc_default(rows[k]), code[k])}
    assert wrong == {}, "README default (left) differs from the dataclass default (right)"


def type_name(t: pa.DataType) -> str:
    """The docs' spelling of an Arrow type."""
    if pa.types.is_list(t):
        return f"list<{type_name(t.value_type)}>"
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, {t.tz}]"
    return {pa.float32(): "float32", pa.bool_(): "bool", pa.string(): "string"}.get(t, str(t))


EVERY_OPTION = OutputSection(flat_latent=True, feature_errors=True, top_k_features=3)
FLAT = "z_0 … z_{k-1}"


def documented_columns() -> list[tuple[str, str]]:
    """`output_schema` with every optional column on, as (documented name, documented type); the id columns are
    one row (their type is the input's) and the flat latent columns one row."""
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


@pytest.mark.parametrize("page,heading", [("README.md", "### Output schema"),
                                          ("docs/operations.md", "## Feature-store ingestion")])
def test_output_tables_match_the_declared_schema(page, heading):
    got = []
    for cells in md_table(ROOT / page, heading):
        name = "id" if "id columns" in cells[0] or cells[0].startswith("`id`") else first_code(cells[0])
        got.append((name, "as in the input" if name == "id" else first_code(cells[1])))
    assert got == documented_columns()


def test_output_schema_follows_the_output_settings():
    ids = [pa.field("user", pa.string()), pa.field("n", pa.int32())]
    plain = output_schema(ids, 4, OutputSection())
    assert plain.names == ["user", "n", "latent", "recon_error", "anomaly_score", "is_anomaly", "model_version",
                           "code_space",
                           "event_timestamp", "scored_at"]
    assert plain.field("user").type == pa.string() and plain.field("n").type == pa.int32()
    full = output_schema(ids, 4, EVERY_OPTION)
    assert full.names[3:7] == ["z_0", "z_1", "z_2", "z_3"]
    assert set(full.names) - set(plain.names) == {"z_0", "z_1", "z_2", "z_3", "feature_errors", "top_features"}


def test_kinds_table_has_every_registered_kind_with_its_settings():
    rows = md_table(DOCS / "model-kinds.md", "## Kinds")
    assert [first_code(r[0]) for r in rows] == list(KINDS)
    for cells in rows:
        spec = KINDS[first_code(cells[0])]
        named = set(re.findall(r"`([^`]*)`", cells[-1]))
        missing = [s for s in spec.setting_names if s not in named]
        assert missing == [], f"kind {spec.name}: settings not in its row: {missing}"
        if not spec.setting_names:
            assert cells[-1] == "none"


def test_learning_rule_table_has_every_algorithm():
    rows = md_table(DOCS / "model-kinds.md", "## Learning rules: `train.algorithm`")
    assert [first_code(r[0]) for r in rows] == list(typing.get_args(typing.get_type_hints(TrainSection)["algorithm"]))


def test_evaluation_table_has_every_benchmark_table_and_the_mean():
    tables = sorted(p.stem for p in (ROOT / "benchmarks" / "adbench").glob("*.npz"))
    rows = md_table(DOCS / "evaluation.md", "## Results")
    assert sorted(r[0].replace("*", "").strip() for r in rows if "mean" not in r[0]) == tables  # "*": the first eight
    assert any("mean" in r[0] for r in rows)
    header = [c.replace("*", "").strip() for c in md_table_header(DOCS / "evaluation.md", "## Results")]
    for column in ("IForest", "PCA", "now (`make eval`)"):
        i = header.index(column)
        assert all(re.match(r"\**[01]\.\d{3}", r[i]) for r in rows), f"{column} column without a figure"


def test_performance_page_holds_the_bench_table_with_its_measures():
    text = (DOCS / "performance.md").read_text()
    assert text.count("<!-- bench-results.md -->") == 1 and text.count("<!-- /bench-results.md -->") == 1
    block = text.split("<!-- bench-results.md -->")[1].split("<!-- /bench-results.md -->")[0]
    assert re.search(r"^Measured \d{4}-\d\d-\d\d", block, re.M), "the table's note (date, machine, load) is gone"
    first_cells = [line.split("|")[1].strip() for line in block.splitlines() if line.startswith("| ")]
    for measure in ("ingest", "training, per worker", "scoring, end to end", "small", "medium", "peak MB"):
        assert any(c.startswith(measure) for c in first_cells), f"bench table has no {measure!r} row"
    assert re.search(r"commit [0-9a-f]{7}", text), "the bench table's commit is not named"


def test_scale_page_holds_the_stage_and_memory_tables():
    rows = md_table(DOCS / "scale.md", "## Results")
    assert [r[0].split(" (")[0] for r in rows] == ["prepare", "one training epoch", "threshold pass", "scoring"]
    text = (DOCS / "scale.md").read_text()
    assert "| peak memory, whole process tree (PSS) |" in text and re.search(r"commit [0-9a-f]{7}", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    body = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *$", body, re.M)}


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links in `path` that are not URLs, code blocks and code spans left out."""
    body = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    body = re.sub(r"`[^`\n]*`", "", body)
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", body)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert broken == []


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README) if t.partition("#")[0]}
    assert doc_pages(), "docs/ has no pages"
    assert [p.name for p in doc_pages() if p.resolve() not in linked] == []


def test_readme_names_no_internal_source_files():
    """The README is the user's guide: modules move, so it names jobs and config keys, not source files."""
    found = re.findall(r"\bpipeline[/.][\w/.]+", README.read_text())
    assert found == []


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(page):
    """Paths in code spans (`pipeline/resume.py`, `tests/test_hangs.py::test_...`, `infra/k8s/`) name files that
    exist, so a moved module or test shows up here rather than in a reader's search."""
    named = re.findall(r"`((?:pipeline|benchmarks|tests|infra|jobs|docs)/[\w./-]*)(?:::\w+)?`", page.read_text())
    assert [p for p in named if not (ROOT / p).exists()] == []


def test_every_test_named_in_the_guarantees_exists():
    """docs/reliability.md maps each guarantee to a test by name: each name is a test function in tests/."""
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)", (DOCS / "reliability.md").read_text()))
    assert len(named) >= 15
    assert sorted(named - defined) == []
