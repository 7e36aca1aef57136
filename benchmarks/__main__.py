"""Benchmark the pipeline against plain PyTorch and pyarrow; writes bench-results.json and bench-results.md.

    python -m benchmarks [--preset full|tiny] [--out bench-results.json]

See benchmarks/bench.py for what is measured and how; docs/performance.md for the latest table.
"""

from __future__ import annotations

import argparse

from benchmarks.bench import preset, run_benchmark
from pipeline.cli import run_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="full: the figures (minutes); tiny: the same code on thousands of rows")
    p.add_argument("--out", default=None, help="JSON results file (the markdown table goes next to it)")
    p.add_argument("--workdir", default=None, help="scratch directory for configs and logs")
    args = p.parse_args(argv)

    def _run() -> None:
        bc = preset(args.preset)
        if args.out:
            bc.out_json = args.out
            bc.out_md = args.out.removesuffix(".json") + ".md"
        if args.workdir:
            bc.workdir = args.workdir
        run_benchmark(bc)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
