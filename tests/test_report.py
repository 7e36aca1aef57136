"""The HTML reports render in a real headless Chromium without errors, with every chart image decoded.

The page carries a script that, on load, records how many <img> elements decoded (complete and
naturalWidth > 0) and whether any script or resource error fired; `--dump-dom` prints the DOM after it ran.
Chromium comes from the OS (`apt-get install -y chromium`; .ci/run installs it on a fresh machine).
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np

from pipeline.report import decile_counts, error_histogram, histogram_counts, scoring_report, training_report

def fake_manifest(rng, n_features=12, epochs=5):
    val = rng.lognormal(-2, 0.6, 2000)
    return {
        "run_name": "unit", "model_version": "unit@0123456789ab", "created_at": "2026-01-01T00:00:00+00:00",
        "model": {"kind": "dense", "hidden_dims": [16, 8]}, "latent_dim": 4, "threshold": float(np.quantile(val, 0.99)),
        "threshold_quantile": 0.99, "feature_names": [f"f{i}" for i in range(n_features)],
        "data": {"input": "s3://b/in", "input_rows": 20000, "files": 4, "train_rows": 18000,
                 "validation_rows": 2000, "rejected_rows": 0},
        "metrics": {"epochs_run": epochs, "best_epoch": epochs - 1, "best_val_loss": 0.1},
        "history": [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1)} for e in range(epochs)],
        "per_feature_error": rng.random(n_features).tolist(),
        "validation_error_histogram": error_histogram(val),
    }, val


def test_training_and_scoring_reports_render_with_all_images(tmp_path, render_page):
    rng = np.random.default_rng(0)
    manifest, val = fake_manifest(rng)
    codes = rng.normal(size=(500, 4))
    flags, truth = codes[:, 0] > 2, codes[:, 1] > 2
    train_page = tmp_path / "report.html"
    train_page.write_text(training_report(manifest, val, codes, flags, truth))
    scored = rng.lognormal(-1.5, 0.6, 3000)
    hist = manifest["validation_error_histogram"]
    counts = {"counts": histogram_counts(scored, hist["edges"]), "deciles": decile_counts(scored, hist["deciles"])}
    score_page = tmp_path / "run_date=2026-01-02.html"
    score_page.write_text(scoring_report(manifest, dt.date(2026, 1, 2), counts, 3000, int((scored > manifest["threshold"]).sum()),
                                         0, "s3://b/out/run_date=2026-01-02"))

    for page, n_images in ((train_page, 4), (score_page, 1)):
        html = page.read_text()
        assert "http://" not in html and "https://" not in html, "a report must not load anything from the network"
        got = render_page(page)
        assert got == {"images": str(n_images), "loaded": str(n_images), "errors": "0", "text": "rendered"}, page
    text = score_page.read_text()
    assert "PSI" in text and "major shift" in text  # the shifted distribution is called out



def test_the_training_report_names_the_scores_term_weights_where_the_model_has_them():
    rng = np.random.default_rng(0)
    manifest, val = fake_manifest(rng)
    codes = rng.normal(size=(50, 4))
    assert "score term weights" not in training_report(manifest, val, codes, np.zeros(50, bool))
    manifest["metrics"]["score_term_weights"] = {"recon": 1.58, "code": 0.1, "mse": 1.76, "knn": 0.06}
    page = training_report(manifest, val, codes, np.zeros(50, bool))
    assert "<th>score term weights</th><td>recon 1.58, code 0.10, mse 1.76, knn 0.06 (each term by its spread" in page

def test_render_check_detects_a_broken_image(tmp_path, render_page):
    """The check is real: a page with an undecodable image is reported as broken."""
    rng = np.random.default_rng(0)
    manifest, val = fake_manifest(rng)
    html = training_report(manifest, val, rng.normal(size=(50, 4)), np.zeros(50, bool))
    broken = re.sub(r'src="data:image/png;base64,[^"]{20}', 'src="data:image/png;base64,AAAAAAAAAAAAAAAAAAAA', html, count=1)
    page = tmp_path / "broken.html"
    page.write_text(broken)
    got = render_page(page)
    assert got["text"] == "broken" and got["loaded"] == "3"
