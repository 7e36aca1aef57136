"""Score Parquet shards with a trained model; publish Parquet under `output.uri/run_date=YYYY-MM-DD/`.

    python -m jobs.score --config jobs/configs/demo.yaml [--model RUN_NAME|latest] [--run-date 2026-01-02]
    python -m jobs.score --config jobs/configs/prod.yaml --model models:/NAME@champion   # follows the alias
    python -m jobs.score --config jobs/configs/demo.yaml --dry-run
"""

from __future__ import annotations

from pipeline.cli import add_schedule_args, base_parser, config_from_args, run_main
from pipeline.dryrun import dry_run
from pipeline.schedule import parse_run_date


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    add_schedule_args(p, model_help="run.name of the model to use, 'latest', or a registered version "
                                   "(models:/NAME@ALIAS, models:/NAME/VERSION); default: this config's run")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        run_date = parse_run_date(args.run_date)
        if args.dry_run:
            dry_run(cfg, model_run=args.model, train=False, run_date=run_date)
            return
        from pipeline.jobs import score_job  # torch and Ray: only past the dry run

        score_job(cfg, model_run=args.model, run_date=run_date)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
