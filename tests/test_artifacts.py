"""Model artifacts are safe and kept: a tampered, foreign or other-format artifact is refused before Ray
starts, and a finished run is not overwritten silently. Both use copies of, or fail before touching, the
session's shared model (`trained_model("s3-vector")`, tests/models.py).
"""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from tests.models import base_args
from tests.procs import assert_one_line_error, in_process, keys, manifest, s3_client


@pytest.fixture
def base(trained_model):
    return trained_model("s3-vector")


def _copy_model(s3: str, bucket: str, src: str, dst: str) -> None:
    c = s3_client(s3)
    for k in keys(s3, bucket, f"artifacts/{src}/model/"):
        c.copy_object(Bucket=bucket, Key=k.replace(f"artifacts/{src}/", f"artifacts/{dst}/"),
                      CopySource={"Bucket": bucket, "Key": k})


def test_tampered_or_foreign_artifact_is_refused(base, s3_server, capsys):
    import torch

    shared_bucket = base.bucket
    c = s3_client(s3_server)
    argv = base_args(s3_server, shared_bucket, out="out-tampered")
    # one flipped byte in the weights
    _copy_model(s3_server, shared_bucket, "base", "tampered")
    key = "artifacts/tampered/model/weights.safetensors"
    blob = bytearray(c.get_object(Bucket=shared_bucket, Key=key)["Body"].read())
    blob[-1] ^= 0xFF
    c.put_object(Bucket=shared_bucket, Key=key, Body=bytes(blob))
    rc, _, err = in_process("jobs.score", argv + ["--model", "tampered"], capsys)
    assert_one_line_error(rc, err, "checksum does not match the manifest")

    # a pickle (which could run code on load) swapped in, with the manifest's checksum updated to match
    _copy_model(s3_server, shared_bucket, "base", "foreign")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    c.put_object(Bucket=shared_bucket, Key="artifacts/foreign/model/weights.safetensors", Body=buf.getvalue())
    m = manifest(s3_server, shared_bucket, "foreign")
    m["weights"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    c.put_object(Bucket=shared_bucket, Key="artifacts/foreign/model/manifest.json", Body=json.dumps(m).encode())
    rc, _, err = in_process("jobs.score", argv + ["--model", "foreign"], capsys)
    assert_one_line_error(rc, err, "weights do not fit the manifest's model")

    # a manifest of some other format
    m["format"] = "someone-else/v9"
    c.put_object(Bucket=shared_bucket, Key="artifacts/foreign/model/manifest.json", Body=json.dumps(m).encode())
    rc, _, err = in_process("jobs.score", argv + ["--model", "foreign"], capsys)
    assert_one_line_error(rc, err, "not a tabular-autoencoder/v1 manifest")
    assert keys(s3_server, shared_bucket, "out-tampered/") == []


def test_finished_run_is_not_overwritten_silently(base, s3_server, capsys):
    shared_bucket, trained = base.bucket, base.manifest
    rc, _, err = in_process("jobs.train", base_args(s3_server, shared_bucket), capsys)
    assert_one_line_error(rc, err, "run base: already trained", "--overwrite")
    # --overwrite with input that fails its checks keeps the old run
    rc, _, err = in_process("jobs.train", base_args(s3_server, shared_bucket, data="nothing-here")
                            + ["--overwrite"], capsys)
    assert_one_line_error(rc, err, "no Parquet files found")
    assert manifest(s3_server, shared_bucket, "base")["model_version"] == trained["model_version"]
