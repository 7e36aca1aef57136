"""Score Parquet shards with a trained model; publish Parquet with a `_SUCCESS` marker.

    python -m jobs.score --config jobs/configs/demo.yaml [--model RUN_NAME]
"""

from __future__ import annotations

from pipeline.cli import base_parser, config_from_args, run_main
from pipeline.jobs import score_job


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--model", default=None, help="run.name of the model to use (default: this config's run)")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        score_job(cfg, model_run=args.model)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
