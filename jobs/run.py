"""Train, then score, then print a summary (with precision/recall/AUROC when the input has planted truth).

    python -m jobs.run --config jobs/configs/demo.yaml [--set ...] [--overwrite]
"""

from __future__ import annotations

from pipeline.cli import base_parser, config_from_args, run_main
from pipeline.cluster import connect
from pipeline.jobs import check_train, evaluate_against_truth, score_job, train_job
from pipeline.storage import Storage


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of the same run.name")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        storage = Storage(cfg.storage)
        spec = check_train(cfg, storage, args.overwrite, output=True)  # fail before Ray starts
        connect(cfg.run.num_cpus)
        t = train_job(cfg, storage, spec=spec)
        s = score_job(cfg, storage)
        lines = [
            "", "== summary ==",
            f"model            {t.model_version} ({t.run_uri})",
            f"rows trained     {t.train_rows} train / {t.validation_rows} validation ({t.rejected_rows} rejected)",
            f"epochs           {t.epochs_run} (best {t.best_epoch + 1})",
            f"validation loss  {t.first_val_loss:.5f} -> {t.best_val_loss:.5f} (train {t.final_train_loss:.5f})",
            f"threshold        {t.threshold:.5f} (q{cfg.score.threshold_quantile} of validation error)",
            f"rows scored      {s.scored_rows} of {s.input_rows} ({s.rejected_rows} rejected) -> {s.output_uri}",
            f"anomalies        {s.anomalies} flagged ({s.anomalies / max(s.scored_rows, 1):.2%})",
        ]
        ev = evaluate_against_truth(cfg, storage, s.output_uri)
        if ev:
            lines.append(f"planted truth    AUROC {ev['auroc']:.3f}, precision {ev['precision']:.3f}, "
                         f"recall {ev['recall']:.3f} ({ev['planted']} planted)")
        print("\n".join(lines), flush=True)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
