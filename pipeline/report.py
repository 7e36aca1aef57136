"""Self-contained HTML reports (PNG charts embedded as base64; one file, no network) for people to read.

    <artifacts.uri>/<run.name>/report.html          training: loss per epoch, validation error distribution
                                                      with the threshold, per-feature mean error, 2-D PCA of
                                                      latent codes coloured by anomaly flag (and planted truth)
    <output.uri>/_reports/run_date=YYYY-MM-DD.html   scoring: this run's error distribution against the
                                                      training one, anomaly count, population stability index

The validation error histogram is stored in the model manifest (`validation_error_histogram`), so a scoring
run compares against training on the same bins without rereading the training data. Charts are drawn with
matplotlib's object API (no pyplot, no global state), so reports can be written from any thread.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from typing import Any, Optional, Sequence

import numpy as np

HIST_BINS = 60


# ------------------------------------------------------------------------------------------ numbers


def error_histogram(scores: np.ndarray, bins: int = HIST_BINS) -> dict[str, list[float]]:
    """Log-spaced bins spanning the validation errors with room on both sides for a drifted scoring run,
    plus the errors' deciles (the bins the drift index uses: 10% of validation rows each by construction)."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    pos = s[s > 0]
    edges = histogram_edges(float(pos.min()) if len(pos) else None, float(s.max()) if len(s) else None, bins)
    deciles = np.quantile(s, np.linspace(0.1, 0.9, 9)) if len(s) else np.zeros(9)
    return {"edges": edges.tolist(), "counts": histogram_counts(s, edges).tolist(), "deciles": deciles.tolist()}


def histogram_edges(pos_min: Optional[float], max_value: Optional[float], bins: int = HIST_BINS) -> np.ndarray:
    """Log-spaced edges from a quarter of the smallest positive error to four times the largest."""
    lo = pos_min / 4 if pos_min is not None else 1e-6
    hi = max_value * 4 if max_value is not None and max_value > 0 else 1.0
    return np.geomspace(lo, max(hi, lo * 10), bins + 1)


def decile_counts(values: np.ndarray, deciles: Sequence[float]) -> np.ndarray:
    """Counts in the 10 bins cut at the training deciles (open-ended at both sides)."""
    return np.bincount(np.searchsorted(np.asarray(deciles), np.asarray(values), side="left"),
                       minlength=len(deciles) + 1).astype(np.int64)


def histogram_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Counts on fixed `edges`; values outside them land in the first or last bin (so nothing is dropped)."""
    e = np.asarray(edges, np.float64)
    v = np.clip(np.asarray(values, np.float64), e[0], e[-1])
    return np.histogram(v, bins=e)[0].astype(np.int64)


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI between two histograms on the same bins (< 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major).

    Meant for a few well-filled bins (the training deciles): on many sparse bins sampling noise alone inflates it.
    """
    e = np.asarray(expected, np.float64) + 0.5  # Laplace smoothing: empty bins must not give log(0)
    a = np.asarray(actual, np.float64) + 0.5
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def pca_2d(codes: np.ndarray) -> np.ndarray:
    """Project latent codes onto their first two principal components (rows, 2)."""
    c = np.asarray(codes, np.float64)
    c = c - c.mean(axis=0, keepdims=True)
    if c.shape[0] < 2:
        return np.zeros((c.shape[0], 2))
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    proj = c @ vt[:2].T
    if proj.shape[1] < 2:  # latent_dim 1: the second axis is empty
        proj = np.hstack([proj, np.zeros((proj.shape[0], 1))])
    return proj


def drift_verdict(psi: float) -> str:
    if psi < 0.1:
        return "stable"
    return "moderate shift" if psi < 0.25 else "major shift: check the input before trusting the flags"


# ------------------------------------------------------------------------------------------ charts


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float = 7.0, h: float = 3.6):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed

    return Figure(figsize=(w, h))


def _finish(fig, ax, xlabel: str, ylabel: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def loss_chart(history: list[dict[str, Any]]) -> str:
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.subplots()
    ep = [h["epoch"] + 1 for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(ep, [h["val_loss"] for h in history], marker="o", label="validation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    return _finish(fig, ax, "epoch", "loss")


def histogram_chart(edges: Sequence[float], series: list[tuple[str, np.ndarray]], threshold: float) -> str:
    """One or more histograms on the same log-spaced bins (as shares of rows) with the threshold marked."""
    fig = _figure()
    ax = fig.subplots()
    e = np.asarray(edges)
    for label, counts in series:
        c = np.asarray(counts, np.float64)
        ax.stairs(c / max(c.sum(), 1), e, label=label, fill=len(series) == 1, alpha=0.8 if len(series) == 1 else 1)
    ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xscale("log")
    return _finish(fig, ax, "reconstruction error (normalized MSE)", "share of rows")


def feature_error_chart(names: list[str], errors: Sequence[float], top: int = 40) -> str:
    err = np.asarray(errors, np.float64)
    order = np.argsort(-err)[:top]
    fig = _figure(7.0, max(2.5, 0.18 * len(order) + 1))
    ax = fig.subplots()
    ax.barh([names[i] for i in order][::-1], err[order][::-1], color="steelblue")
    ax.set_xlabel("mean squared error on validation rows (normalized)")
    ax.set_title(f"per-feature error ({len(order)} largest of {len(err)})" if len(err) > top else "per-feature error")
    ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


def projection_chart(points: np.ndarray, flags: np.ndarray, truth: Optional[np.ndarray]) -> str:
    panels = [("flagged by the model", flags)] + ([("planted truth", truth)] if truth is not None else [])
    fig = _figure(4.2 * len(panels), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, mark) in zip(axes, panels):
        m = np.asarray(mark, bool)
        ax.scatter(points[~m, 0], points[~m, 1], s=4, alpha=0.4, color="grey", label=f"normal ({int((~m).sum())})")
        ax.scatter(points[m, 0], points[m, 1], s=12, color="crimson", label=f"anomaly ({int(m.sum())})")
        ax.set_title(title)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


# ------------------------------------------------------------------------------------------ HTML

_CHECK_SCRIPT = """
<script>
// Marks the page once loaded: how many images decoded, and whether any script or resource error occurred.
window.__reportErrors = [];
window.addEventListener('error', function (e) { window.__reportErrors.push(String(e.message || e.type)); }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById('render-check');
  el.setAttribute('data-images', String(imgs.length));
  el.setAttribute('data-loaded', String(ok));
  el.setAttribute('data-errors', String(window.__reportErrors.length));
  el.textContent = (ok === imgs.length && window.__reportErrors.length === 0) ? 'rendered' : 'broken';
});
</script>
"""

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse}td,th{padding:2px 12px 2px 0;text-align:left}"
          "img{max-width:100%;display:block;margin:0.5em 0 1.5em}h2{margin-top:1.5em}"
          "#render-check{color:#999;font-size:small}")


def render_html(title: str, facts: list[tuple[str, Any]], sections: list[tuple[str, str, str]]) -> str:
    """`facts`: (name, value) rows, those without a value (None) left out; `sections`: (heading, caption, base64
    PNG)."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts
                   if v is not None)
    body = "".join(f"<h2>{html.escape(h)}</h2><p>{html.escape(c)}</p>"
                   f'<img alt="{html.escape(h)}" src="data:image/png;base64,{img}">' for h, c, img in sections)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><table>{rows}</table>{body}"
            f"<p id=\"render-check\">loading</p>{_CHECK_SCRIPT}</body></html>")


def term_weights_text(weights: dict[str, float]) -> str:
    """The calibrated score's term weights (manifest metrics.score_term_weights) as `recon 1.58, code 0.10, ...`."""
    return ", ".join(f"{k} {w:.2f}" for k, w in weights.items())


def training_report(manifest: dict[str, Any], val_scores: np.ndarray, codes: np.ndarray, flags: np.ndarray,
                    truth: Optional[np.ndarray] = None, val_rows: Optional[int] = None) -> str:
    """The training run's report from its manifest, validation errors (or a sample of them, of `val_rows`)
    and a sample of validation latent codes."""
    m = manifest.get("metrics", {})
    d = manifest.get("data", {})
    thr = float(manifest["threshold"])
    hist = manifest.get("validation_error_histogram") or error_histogram(val_scores)
    facts = [
        ("run", manifest.get("run_name")), ("model version", manifest.get("model_version")),
        ("model", f"{manifest['model'].get('kind')} {manifest['model'].get('hidden_dims')} -> "
                  f"{manifest.get('latent_dim')}"),
        ("input", f"{d.get('input')} ({d.get('input_rows')} rows in {d.get('files')} files)"),
        ("rows", f"{d.get('train_rows')} train / {d.get('validation_rows')} validation / "
                 f"{d.get('rejected_rows')} rejected"),
        ("epochs", f"{m.get('epochs_run')} (best {int(m.get('best_epoch', 0)) + 1})"
                   + (f"; {m['still_improving']}" if m.get("still_improving") else "")),
        ("best validation loss", f"{m.get('best_val_loss', float('nan')):.6g}"),
        ("threshold", f"{thr:.6g} (q{manifest.get('threshold_quantile')} of {val_rows or len(val_scores)} validation errors)"),
        ("score term weights", f"{term_weights_text(m['score_term_weights'])} (each term by its spread over the "
                               "validation rows)" if m.get("score_term_weights") else None),
        ("code space", (manifest.get("code_alignment") or {}).get("line", manifest.get("code_space"))),
        ("created", manifest.get("created_at")),
    ]
    sections = [
        ("Loss per epoch", "Mean loss over the training and validation rows after each epoch (log scale).",
         loss_chart(manifest.get("history", []))),
        ("Validation reconstruction errors", "Share of validation rows per error bin; rows right of the "
         "dashed line are flagged as anomalies.", histogram_chart(hist["edges"], [("validation",
                                                                                   np.asarray(hist["counts"]))], thr)),
        ("Per-feature mean error", "Features the model reconstructs worst on validation rows.",
         feature_error_chart(list(manifest["feature_names"]), manifest.get("per_feature_error", []))),
        ("Latent codes (2-D PCA)", f"First two principal components of the latent codes of {len(codes)} "
         "validation rows, coloured by the model's flag" + (" and by the planted truth." if truth is not None
                                                           else "."), projection_chart(pca_2d(codes), flags, truth)),
    ]
    return render_html(f"Training report: {manifest.get('run_name')}", facts, sections)


def scoring_report(manifest: dict[str, Any], run_date: dt.date, counts: dict[str, np.ndarray], scored_rows: int,
                   anomalies: int, rejected_rows: int, output_uri: str) -> str:
    """This run's error histogram against the training validation histogram, on the manifest's bins.

    `counts`: {"counts": on the histogram's edges, "deciles": on the training deciles} (`output_error_counts`).
    """
    hist = manifest["validation_error_histogram"]
    train_counts = np.asarray(hist["counts"])
    thr = float(manifest["threshold"])
    expected = 1.0 - float(manifest.get("threshold_quantile", 0.99))
    rate = anomalies / max(scored_rows, 1)
    psi = population_stability_index(np.ones(10), counts["deciles"])  # training: 10% of rows per decile
    facts = [
        ("run date", run_date.isoformat()), ("model version", manifest.get("model_version")),
        ("output", output_uri), ("rows scored", f"{scored_rows} ({rejected_rows} rejected)"),
        ("anomalies", f"{anomalies} ({rate:.3%}; {expected:.3%} expected from the training threshold)"),
        ("error distribution vs training", f"PSI {psi:.3f} over the training deciles: {drift_verdict(psi)}"),
    ]
    sections = [("Reconstruction errors: this run vs training",
                 "Share of rows per error bin, this run against the validation rows the model was trained with; "
                 "a shift to the right is the first sign of data drift.",
                 histogram_chart(hist["edges"], [("training (validation rows)", train_counts),
                                                 (f"run {run_date.isoformat()}", counts["counts"])], thr))]
    return render_html(f"Scoring report: {run_date.isoformat()}", facts, sections)


