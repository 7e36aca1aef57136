"""The MLflow pyfunc model of a registered version, logged as code (MLflow's models-from-code: no pickle).

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict(df)   # -> DataFrame: latent (list of floats), recon_error, anomaly_score (float32), is_anomaly,
                        #    code_space (the version whose coordinates latent uses, as in the batch output)

`df` holds the model's feature columns as the input Parquet has them (others are ignored). The numbers are the
batch job's: the same checksum-verified artifact (`load_artifact`) and the same `Predictor` score the rows.
A row the batch job would reject (an infinite value; a null under data.missing=error or drop) is an error
here rather than a missing output row. MLflow runs this file when it loads the model; it needs the pipeline
package importable there (`pip install -e .` of this repository).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import mlflow.pyfunc
import pandas as pd
import pyarrow as pa
from mlflow.models import set_model

from pipeline.artifacts import load_artifact
from pipeline.manifest import featurizer_of
from pipeline.config import DataSection, StorageSection
from pipeline.registry import PYFUNC_ARTIFACT
from pipeline.predictor import Predictor
from pipeline.scorer import BatchScorer
from pipeline.storage import Storage

OUTPUT_COLUMNS = ["latent", "recon_error", "anomaly_score", "is_anomaly", "code_space"]


def data_section(manifest: dict) -> DataSection:
    """The training's data settings with the model's own feature columns, no id or timestamp columns, and
    bad rows refused rather than dropped (a prediction returns one row per input row)."""
    data = DataSection(**manifest["config"]["data"])
    fz = featurizer_of(manifest)
    return dataclasses.replace(data, features=fz.vector or fz.names, id_columns=[], timestamp_column=None,
                               nan_policy="error", missing="error" if data.missing == "drop" else data.missing)


class AutoencoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        loaded = load_artifact(Storage(StorageSection()), context.artifacts[PYFUNC_ARTIFACT])
        predictor = Predictor(loaded.model, loaded.featurizer, manifest=loaded.manifest)
        self.predictor = BatchScorer(predictor, data_section(loaded.manifest), as_of=dt.datetime.now(dt.timezone.utc))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        table = pa.Table.from_pandas(pd.DataFrame(model_input), preserve_index=False)
        out = self.predictor(table)
        return pd.DataFrame({"latent": out.column("latent").to_pylist(),
                             "recon_error": out.column("recon_error").to_numpy(),
                             "anomaly_score": out.column("anomaly_score").to_numpy(),
                             "is_anomaly": out.column("is_anomaly").to_numpy(zero_copy_only=False),
                             "code_space": out.column("code_space").to_pylist()})


set_model(AutoencoderModel())
