"""Feast definitions over the pipeline's output (`output.uri`, all `run_date=…/` partitions).

One row per scored input row: the entity is the input's `id` column (data.id_columns), `event_timestamp` is
the event time, `scored_at` the created timestamp (so a rescored row supersedes the older score for the same
event). `SCORES_URI` names the output prefix; on S3, FileSource also takes `s3_endpoint_override`.

`latent` is in the coordinates of the row's `code_space` (a retrained model aligned to the previous one keeps
its code space; one that could not be aligned starts its own): a model trained on `latent` must record the
code space it was trained on and take `latent` only from rows in that code space.
"""

import os
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource
from feast.data_format import ParquetFormat
from feast.types import Array, Bool, Float32, String
from feast.value_type import ValueType

scored_row = Entity(name="scored_row", join_keys=["id"], value_type=ValueType.INT64,
                    description="One input row, by data.id_columns")

anomaly_scores_source = FileSource(
    name="anomaly_scores",
    path=os.environ.get("SCORES_URI", "s3://example-features/anomaly-scores/"),
    file_format=ParquetFormat(),
    timestamp_field="event_timestamp",
    created_timestamp_column="scored_at",
    s3_endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None,
)

anomaly_scores = FeatureView(
    name="anomaly_scores",
    entities=[scored_row],
    ttl=timedelta(days=30),
    schema=[
        Field(name="latent", dtype=Array(Float32), description="the autoencoder's code for the row"),
        Field(name="recon_error", dtype=Float32, description="the row's reconstruction error (mean per-column error)"),
        Field(name="anomaly_score", dtype=Float32, description="the model's anomaly score (ranks the rows)"),
        Field(name="is_anomaly", dtype=Bool, description="anomaly_score above the model's threshold"),
        Field(name="top_features", dtype=Array(String), description="features with the largest error"),
        Field(name="model_version", dtype=String, description="<run.name>@<weights sha256 prefix>"),
        Field(name="code_space", dtype=String,
              description="the model version whose coordinates latent uses; a downstream model must record the "
                          "code space it was trained on and use latent only from rows in that code space"),
    ],
    online=True,
    source=anomaly_scores_source,
)
