"""Anomaly-ranking quality: the pipeline's defaults against IsolationForest and PCA on labelled tables.

    python -m jobs.evaluate                                   # the 31 tables shipped in benchmarks/adbench/
    python -m jobs.evaluate --suite small                     # all but the five large ones (also: large, dev8)
    python -m jobs.evaluate --suite novelty                   # one-class tasks: trained on normal classes only
    python -m jobs.evaluate --tables 6_cardio,40_vowels       # some of them
    python -m jobs.evaluate --input my.parquet --label-column is_fraud   # your own labelled table
    python -m jobs.evaluate --set train.epochs=50             # the pipeline with settings other than defaults
    python -m jobs.evaluate --suite codes                     # the latent codes: vs PCA, across retrains
    python -m jobs.evaluate --merge a.json,b.json             # runs over parts of the tables, as one result

Writes eval-results.json and eval-results.md (see pipeline/evaluation.py for the protocol); `--suite codes`
writes codes-results.json and codes-results.md (pipeline/codes_evaluation.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pipeline.cli import run_main
from pipeline.errors import InputError
from pipeline.evaluation import SUITES, evaluate_tables, load_labelled, load_table, markdown, merge, suite_tables


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", choices=(*SUITES, "codes"),
                   help="which shipped tables: all, small (all but the five large), large, dev8 (the first eight); "
                        "novelty: one-class tasks on scikit-learn's bundled tables (trained on the normal classes "
                        "only); codes: the latent codes on labelled classification tables")
    p.add_argument("--tables", default=None,
                   help="comma-separated names from benchmarks/adbench/ or novelty tasks (instead of --suite)")
    p.add_argument("--input", default=None, help="your own labelled table (Parquet file/folder, CSV or .npz)")
    p.add_argument("--label-column", default=None, help="with --input: the 0/1 column (1 = anomaly)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline config override (repeatable); default: the pipeline's defaults")
    p.add_argument("--out", default="eval-results.json", help="JSON results (the markdown table goes next to it)")
    p.add_argument("--workdir", default=None, help="scratch directory for splits, models and scores")
    p.add_argument("--merge", default=None, help="comma-separated eval-results files to merge (runs nothing)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    args = p.parse_args(argv)
    if args.suite == "codes":
        return run_main(lambda: codes_suite(args))

    def write(results: dict) -> None:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        Path(args.out.removesuffix(".json") + ".md").write_text(markdown(results))

    def _run() -> None:
        if args.merge:
            write(merge([json.loads(Path(f).read_text()) for f in args.merge.split(",")]))
            return
        if args.input:
            if not args.label_column:
                raise InputError("--input needs --label-column (the 0/1 column, 1 = anomaly)")
            tables = [load_labelled(args.input, args.label_column)]
        else:
            names = args.tables.split(",") if args.tables else suite_tables(args.suite)
            tables = [load_table(n) for n in names]
        with tempfile.TemporaryDirectory(prefix="eval-") as tmp:
            results = evaluate_tables(tables, Path(args.workdir or tmp), args.overrides, args.num_cpus, on_table=write)
        print(markdown(results), flush=True)

    return run_main(_run)


def codes_suite(args: argparse.Namespace) -> None:
    """`--suite codes`: the latent codes against PCA and the input, and across retrains (--tables from TABLES)."""
    from pipeline.codes_evaluation import TABLES, evaluate_codes, markdown as codes_markdown

    names = args.tables.split(",") if args.tables else list(TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise InputError(f"--tables: {', '.join(unknown)} not among {', '.join(TABLES)}")
    out = "codes-results.json" if args.out == "eval-results.json" else args.out

    def write(results: dict) -> None:
        Path(out).write_text(json.dumps({"codes": results}, indent=2) + "\n")
        Path(out.removesuffix(".json") + ".md").write_text("## Latent codes\n\n" + codes_markdown(results))

    with tempfile.TemporaryDirectory(prefix="eval-codes-") as tmp:
        results = evaluate_codes([TABLES[n]() for n in names], Path(args.workdir or tmp), args.overrides,
                                 args.num_cpus, on_table=write)
    print(codes_markdown(results), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
