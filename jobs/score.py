"""Score Parquet shards with a trained model; publish Parquet with a `_SUCCESS` marker.

    python -m jobs.score --config jobs/configs/demo.yaml [--model RUN_NAME]
"""

from __future__ import annotations

from pipeline.cli import base_parser, config_from_args, run_main
from pipeline.cluster import connect
from pipeline.jobs import check_score, model_run_uri, score_job
from pipeline.storage import Storage


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--model", default=None, help="run.name of the model to use (default: this config's run)")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        storage = Storage(cfg.storage)
        # model, input and storage problems fail before Ray starts
        spec = check_score(cfg, storage, model_run_uri(cfg, args.model), cfg.output.uri)
        connect(cfg.run.num_cpus)
        score_job(cfg, storage, model_run=args.model, spec=spec)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
