"""Run inside the Feast venv (.venv-feast): apply the repo, read features back offline and online.

    python feast_roundtrip.py REPO_DIR REQUEST_JSON OUT_JSON

REQUEST_JSON: {"ids": [...], "event_timestamps": [ISO strings], "materialize_end": ISO string}.
Writes {"historical": {id: {feature: value}}, "online": {id: {...}}} to OUT_JSON.
"""

import json
import subprocess
import sys
from datetime import datetime

import pandas as pd
from feast import FeatureStore

FEATURES = ["latent", "recon_error", "anomaly_score", "is_anomaly", "top_features", "model_version", "code_space"]


def plain(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def main(repo: str, request_path: str, out_path: str) -> None:
    subprocess.run([sys.executable, "-m", "feast.cli.cli", "apply"], cwd=repo, check=True)
    req = json.load(open(request_path))
    store = FeatureStore(repo_path=repo)
    refs = [f"anomaly_scores:{f}" for f in FEATURES]
    entity_df = pd.DataFrame({"id": req["ids"], "event_timestamp": pd.to_datetime(req["event_timestamps"], utc=True)})
    hist = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    historical = {int(r["id"]): {f: plain(r[f]) for f in FEATURES} for _, r in hist.iterrows()}

    store.materialize(start_date=datetime.fromisoformat(req["materialize_start"]),
                      end_date=datetime.fromisoformat(req["materialize_end"]))
    online = store.get_online_features(features=refs, entity_rows=[{"id": i} for i in req["ids"]]).to_dict()
    online_rows = {int(i): {f: plain(online[f][k]) for f in FEATURES} for k, i in enumerate(online["id"])}
    json.dump({"historical": historical, "online": online_rows}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
