"""The import contract of pipeline/: layers that point down, no cycles, every module placed, and small files.

The import graph is read with `ast` (no module is imported): every `import` and `from ... import`, at module
level, inside functions and under TYPE_CHECKING, counts; a lazy import that closes a loop is a cycle all the
same. A name imported from a module lands in that module; from a package, in its `__init__` unless the name
is a submodule (the same resolution as the shared tools/import_layers.py).

To place a new module, add it to its floor in FLOORS: a floor may import its own floor and the floors below,
never one above.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

FLOORS: dict[str, list[str]] = {
    # what the jobs/*.py entrypoints call, and the benchmark evaluation, which runs whole jobs per table
    "entrypoints": ["cli", "evaluation", "codes_evaluation"],
    # the three jobs as library calls: train, score, dry run
    "orchestration": ["jobs", "dryrun"],
    # the Ray phases of a job
    "stages": ["train", "score", "scorer", "validation", "sketch", "schedule", "prepare", "preflight", "tracking",
               "pyfunc_model", "code_space"],
    # data in, models, storage, the cluster: what the stages are built from
    "core": ["artifacts", "inputs", "read", "rows", "shards", "roles", "stats", "featurizer", "predictor", "alignment", "output",
             "publish", "registry", "manifest", "metrics", "report", "models", "recirculation", "calibration", "tensors", "storage",
             "resources", "multinode", "cluster", "watchdog", "sample", "phases"],
    # typed settings and the rules on them; none of it imports torch
    "settings": ["config", "kinds", "sizing", "layout", "tracking_section"],
    "leaves": ["errors", "uri", "__init__"],
}
"""Floor -> module names relative to pipeline/ (a package name covers its submodules; `__init__` is the package
itself), top floor first."""

MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400

# Being split on the `datapath` branch (one-concern files); delete each entry when its split is merged. A
# stale entry fails test_pending_exemptions_are_still_needed, so the list only shrinks.
PENDING_CYCLES: list = []
PENDING_LONG_FILES: set = set()
PENDING_LONG_FUNCTIONS: set = set()


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name relative to the package (`train.step`; the package itself `__init__`) -> file."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its file)."""
    mods = modules(root)
    pkg = root.name

    def resolve(dotted: str) -> str | None:
        name = dotted[len(pkg) + 1:] if dotted != pkg else "__init__"
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or ("__init__" if dotted.split(".")[0] == pkg and "__init__" in mods else None)

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        inside = [pkg] + ([] if m == "__init__" else m.split("."))
        here = inside if f.name == "__init__.py" else inside[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[: len(here) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                if t.split(".")[0] != pkg:
                    continue
                r = resolve(t)
                if r and r != m:
                    edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def floor_of(module: str) -> str | None:
    for floor, names in FLOORS.items():
        if any(module == n or module.startswith(n + ".") for n in names):
            return floor
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    rank = {floor: i for i, floor in enumerate(FLOORS)}  # 0: the top floor
    out = []
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            fm, ft = floor_of(m), floor_of(t)
            if fm and ft and rank[ft] < rank[fm]:
                out.append(f"pipeline.{m} ({fm}) imports pipeline.{t} ({ft}), a floor above it")
    return out


def long_functions(root: Path = PACKAGE) -> dict[str, int]:
    """`file:function` -> lines, for every function (methods and nested ones too) over MAX_FUNCTION_LINES."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out[f"{f.relative_to(root)}:{node.name}"] = lines
    return out


def long_files(root: Path = PACKAGE) -> dict[str, int]:
    lengths = {str(f.relative_to(root)): len(f.read_text().splitlines()) for f in sorted(root.rglob("*.py"))}
    return {f: n for f, n in lengths.items() if n > MAX_FILE_LINES}


# ------------------------------------------------------------------------------------------------ the contract


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if c not in PENDING_CYCLES]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_imports_point_down_the_floors():
    upward = upward_imports(import_graph())
    assert not upward, "\n".join(upward)


def test_every_module_is_on_a_floor():
    unplaced = [m for m in modules() if floor_of(m) is None]
    assert not unplaced, f"place these modules in tests/test_layers.py FLOORS: {unplaced}"


def test_every_floor_entry_names_a_module():
    mods = modules()
    stale = [n for names in FLOORS.values() for n in names
             if not any(m == n or m.startswith(n + ".") for m in mods)]
    assert not stale, f"FLOORS names modules that do not exist: {stale}"


def test_no_function_over_60_lines():
    over = {k: n for k, n in long_functions().items() if k not in PENDING_LONG_FUNCTIONS}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_no_file_over_400_lines():
    over = {k: n for k, n in long_files().items() if k not in PENDING_LONG_FILES}
    assert not over, f"files over {MAX_FILE_LINES} lines: {over}"


def test_pending_exemptions_are_still_needed():
    assert all(c in cycles(import_graph()) for c in PENDING_CYCLES), "a pending cycle is gone: remove its entry"
    assert PENDING_LONG_FILES <= set(long_files()), "a pending long file is split: remove its entry"
    assert PENDING_LONG_FUNCTIONS <= set(long_functions()), "a pending long function is split: remove its entry"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A cycle through a lazy import, an upward import under TYPE_CHECKING, and a relative import all count."""
    pkg = tmp_path / "pipeline"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("from .step import step\n")
    (pkg / "train" / "step.py").write_text("def step():\n    from pipeline.config import X\n")
    (pkg / "config.py").write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pipeline.train import step
        X = 1
    """))
    edges = import_graph(pkg)
    assert edges["train"] == {"train.step"} and edges["train.step"] == {"config"}
    assert edges["config"] == {"train", "train.step"}  # the package and the submodule the name is
    assert cycles(edges) == [{"config", "train", "train.step"}]
    assert upward_imports(edges) == [f"pipeline.config (settings) imports pipeline.{t} (stages), a floor above it"
                                     for t in ("train", "train.step")]


# ------------------------------------------------------------------------------------------- torch stays out


def _no_torch(code: str) -> None:
    """Run `code` in a fresh interpreter, then fail if it imported torch (or Ray)."""
    probe = code + "\nimport sys\nheavy = [m for m in ('torch', 'ray') if m in sys.modules]\nassert not heavy, heavy\n"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_loading_a_config_does_not_import_torch():
    _no_torch(textwrap.dedent("""
        from pathlib import Path
        from pipeline.config import load_config
        for path in sorted(Path("jobs/configs").glob("*.yaml")):
            cfg = load_config(path, ["model.kind=variational", "model.score=elbo"])
            cfg.model.check_features(64)
            assert cfg.model.spec.name == "variational"
        from pipeline.sizing import resolve_model, step_budget
        resolve_model(load_config("jobs/configs/tiny.yaml").model, 16)
        step_budget(1024, 5000, "auto", 2000)
    """))


def test_the_cli_reads_its_flags_and_config_without_torch():
    """What every job does before its work (parse the flags, load and check the config), and the parts of a
    dry run that check the input, load without torch."""
    _no_torch(textwrap.dedent("""
        from pipeline.cli import base_parser, config_from_args
        import pipeline.inputs, pipeline.featurizer, pipeline.rows, pipeline.storage
        args = base_parser("probe").parse_args(["--config", "jobs/configs/tiny.yaml", "--set", "train.epochs=2"])
        assert config_from_args(args).train.epochs == 2
    """))


def test_a_dry_run_of_each_job_imports_neither_torch_nor_ray(tmp_path):
    """`--dry-run` checks config, storage and the input's footers (and for scoring, a stored model's manifest)
    in a fresh interpreter without loading torch or Ray."""
    _no_torch(textwrap.dedent(f"""
        import json, os
        import pyarrow as pa, pyarrow.parquet as pq
        root = {str(tmp_path)!r}
        os.makedirs(root + "/in")
        pq.write_table(pa.table({{"id": [1, 2, 3], "a": [1.0, 2.0, 3.0], "b": [0.5, 0.1, 0.2]}}), root + "/in/p.parquet")
        os.makedirs(root + "/art/m/model")
        json.dump({{"format": "tabular-autoencoder/v1", "model_version": "m@1", "feature_names": ["a", "b"],
                   "config": {{"data": {{"input": root + "/in", "features": ["a", "b"], "id_columns": ["id"]}}}}}},
                  open(root + "/art/m/model/manifest.json", "w"))
        sets = ["--set", "data.input=" + root + "/in", "--set", "data.id_columns=[id]", "--set", "data.features=auto",
                "--set", "artifacts.uri=" + root + "/art", "--set", "output.uri=" + root + "/out", "--set",
                "data.exclude_columns=[]", "--set", "data.timestamp_column=null"]
        from jobs import run, score, train
        assert train.main(["--config", "jobs/configs/tiny.yaml", *sets, "--dry-run"]) == 0
        assert score.main(["--config", "jobs/configs/tiny.yaml", *sets, "--model", "m", "--dry-run"]) == 0
        assert run.main(["--config", "jobs/configs/tiny.yaml", *sets, "--dry-run"]) == 0
    """))


def test_the_training_step_the_models_and_the_predictor_run_without_ray():
    """What a GPU box runs without Ray's wheel (`make bench-gpu`, tests/test_benchmark.py runs its measures):
    the training step, the models, the predictor and the scorer import no Ray. One fresh interpreter for all of
    them: Ray is absent after each import, so no one of them imported it."""
    code = textwrap.dedent("""
        import sys
        for module in ("pipeline.train.step", "pipeline.train", "pipeline.models", "pipeline.predictor",
                       "pipeline.scorer", "pipeline.score", "benchmarks.gpu"):
            __import__(module)
            assert 'ray' not in sys.modules, ('ray', module)
        assert 'torch' in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
