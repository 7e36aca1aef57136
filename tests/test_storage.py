"""Storage helpers against a real S3-compatible server on loopback, and the local filesystem."""

from __future__ import annotations

import pytest

from pipeline.config import StorageSection
from pipeline.errors import StorageError
from pipeline.storage import Storage
from pipeline.uri import normalize_uri, scheme_of


def test_uri_helpers(tmp_path, monkeypatch):
    assert scheme_of("s3://b/k") == "s3" and scheme_of("/a/b") == "file" and scheme_of("gs://x") == "gs"
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("rel/dir") == str(tmp_path / "rel" / "dir")
    assert normalize_uri("s3://b/k/") == "s3://b/k"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_roundtrip_list_move_delete(where, storage, bucket, tmp_path):
    root = f"s3://{bucket}/root" if where == "s3" else str(tmp_path / "root")
    storage.write_json(f"{root}/a/one.json", {"x": 1})
    storage.write_bytes(f"{root}/a/two.bin", b"\x00\x01")
    storage.write_bytes(f"{root}/a/_hidden", b"h")
    storage.write_bytes(f"{root}/b/three.parquet", b"p")
    assert storage.read_json(f"{root}/a/one.json") == {"x": 1}
    assert storage.read_bytes(f"{root}/a/two.bin") == b"\x00\x01"
    assert storage.list_files(root) == [f"{root}/a/one.json", f"{root}/a/two.bin", f"{root}/b/three.parquet"]
    assert storage.list_files(root, suffix=".parquet") == [f"{root}/b/three.parquet"]
    assert storage.exists(f"{root}/a/_hidden") and storage.is_dir(f"{root}/a")
    storage.move(f"{root}/a/two.bin", f"{root}/c/two.bin")
    assert not storage.exists(f"{root}/a/two.bin") and storage.read_bytes(f"{root}/c/two.bin") == b"\x00\x01"
    storage.delete_dir(f"{root}/a")
    assert storage.list_files(root) == [f"{root}/b/three.parquet", f"{root}/c/two.bin"]
    assert storage.list_files(f"{root}/nothing-here") == []
    storage.check_writable(root)


def test_endpoint_from_environment(s3_server, bucket, monkeypatch):
    """pyarrow ignores AWS_ENDPOINT_URL on its own; Storage reads it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    st = Storage(StorageSection())
    st.write_bytes(f"s3://{bucket}/env.txt", b"ok")
    assert st.read_bytes(f"s3://{bucket}/env.txt") == b"ok"


def test_missing_bucket_is_one_line(storage):
    with pytest.raises(StorageError) as e:
        storage.check_writable("s3://no-such-bucket-here/x")
    assert "no-such-bucket-here" in str(e.value) and "\n" not in str(e.value)


def test_storage_pickles_without_its_clients(storage, bucket):
    """What Ray ships to each task is the config alone: the S3 client made here stays here, and the copy
    makes its own on first use."""
    import pickle

    storage.exists(f"s3://{bucket}/x")  # makes and keeps this process's S3 client
    data = pickle.dumps(storage)
    assert b"pyarrow" not in data and b"S3FileSystem" not in data, "a filesystem client was pickled"
    clone = pickle.loads(data)
    clone.write_bytes(f"s3://{bucket}/p.txt", b"1")
    assert storage.read_bytes(f"s3://{bucket}/p.txt") == b"1"
    assert clone.filesystem(f"s3://{bucket}/p.txt") is not storage.filesystem(f"s3://{bucket}/p.txt")
