"""Train (or reuse a stored model), then score, then print a summary (with precision/recall/AUROC when the
input has planted truth).

    python -m jobs.run --config jobs/configs/demo.yaml [--set ...] [--overwrite]
    python -m jobs.run --config jobs/configs/prod.yaml --model latest --run-date 2026-01-02   # nightly scoring
    python -m jobs.run --config jobs/configs/prod.yaml --dry-run     # check config, storage, input; no Ray
"""

from __future__ import annotations

from pipeline.cli import add_schedule_args, base_parser, config_from_args, run_main
from pipeline.dryrun import dry_run
from pipeline.metrics import evaluate_against_truth
from pipeline.schedule import parse_run_date
from pipeline.storage import Storage


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run of the same run.name")
    add_schedule_args(p, model_help="score with this stored model (a run.name, 'latest', or models:/NAME@ALIAS) "
                                      "instead of training")
    args = p.parse_args(argv)

    def _run() -> None:
        cfg = config_from_args(args)
        run_date = parse_run_date(args.run_date)
        storage = Storage(cfg.storage)
        if args.dry_run:
            dry_run(cfg, storage, model_run=args.model, train=args.model is None, run_date=run_date)
            return
        from pipeline.jobs import score_job, train_job  # torch and Ray: only past the dry run

        lines = ["", "== summary =="]
        if args.model is None:
            t = train_job(cfg, storage, overwrite=args.overwrite, check_output=True)
            lines += [
                f"model            {t.model_version} ({t.run_uri})",
                f"rows trained     {t.train_rows} train / {t.validation_rows} validation ({t.rejected_rows} rejected)",
                f"epochs           {t.epochs_run} (best {t.best_epoch + 1})"
                + (f"\n                 warning: {t.still_improving}" if t.still_improving else ""),
                f"validation loss  {t.first_val_loss:.5f} -> {t.best_val_loss:.5f} (train {t.final_train_loss:.5f})",
                f"threshold        {t.threshold:.5f} (q{cfg.train.threshold_quantile} of validation error)",
                f"code space       {t.manifest['code_alignment']['line']}",
                f"report           {t.run_uri}/report.html",
            ]
        s = score_job(cfg, storage, model_run=args.model, run_date=run_date)
        if s is None:
            lines.append("rows scored      0 (every input partition already scored by this model)")
        else:
            lines += [
                f"rows scored      {s.scored_rows} of {s.input_rows} ({s.rejected_rows} rejected) with "
                f"{s.model_version} -> {s.output_uri}",
                f"anomalies        {s.anomalies} flagged ({s.anomalies / max(s.scored_rows, 1):.2%})"
                + (f"\n                 warning: {s.flagged_note}" if s.flagged_note else ""),
            ]
            ev = evaluate_against_truth(cfg, storage, s.output_uri)
            if ev:
                lines.append(f"planted truth    AUROC {ev['auroc']:.3f}, precision {ev['precision']:.3f}, "
                             f"recall {ev['recall']:.3f} ({ev['planted']} planted)")
                for kind, a in ev.get("auroc_by_kind", {}).items():
                    lines.append(f"  {kind + '-only':<14} AUROC {a:.3f} (planted rows only these columns reveal)")
        print("\n".join(lines), flush=True)

    return run_main(_run)


if __name__ == "__main__":
    raise SystemExit(main())
