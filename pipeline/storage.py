"""Object storage access: one place that turns a URI into a pyarrow filesystem and a path.

- `s3://bucket/key`: pyarrow's native S3 client (C++, no GIL, bounded retries), pointed at
  `storage.endpoint_url` or `AWS_ENDPOINT_URL` for S3-compatible stores (pyarrow ignores that variable on
  its own, so it is read here). Credentials come from the standard AWS chain only.
- other fsspec URIs (`gs://`, `abfs://`, `memory://`, ...): the fsspec filesystem, wrapped for pyarrow.
- plain paths: the local filesystem (made absolute, so Ray workers see the same files as the driver).

`Storage` is picklable: Ray tasks and actors take it and build their filesystem on first use.
Errors reaching storage become a one-line `StorageError` naming the URI (never a credential).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import pyarrow.fs as pafs

from pipeline.errors import StorageError
from pipeline.uri import join_uri, normalize_uri, scheme_of, strip_scheme

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from pipeline.config import StorageSection

def endpoint_from(cfg: StorageSection) -> Optional[str]:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def describe_os_error(err: BaseException, uri: str, endpoint: Optional[str] = None) -> str:
    """Map the storage client's error text to a short, actionable reason (no secrets: none are in `err`)."""
    text = str(err)
    low = text.lower()
    where = f" at {endpoint}" if endpoint else ""
    if any(s in low for s in ("nosuchbucket", "no_such_bucket", "bucket does not exist")) or re.search(
            r"bucket '[^']*' not found", low):
        return f"{uri}: bucket not found{where}"
    if any(s in low for s in ("invalidaccesskeyid", "invalid_access_key_id", "signaturedoesnotmatch",
                              "signature_does_not_match", "access denied", "accessdenied", "access_denied",
                              "forbidden", "http status code 403", "invalidtoken", "expiredtoken",
                              "expired_token", "invalid_token")):
        return f"{uri}: access denied{where} (check the AWS credentials)"
    if any(s in low for s in ("curl", "connection refused", "couldn't connect", "could not connect",
                              "timed out", "timeout", "unreachable", "network_connection", "resolve host",
                              "cannot connect")):
        return f"{uri}: cannot reach the storage endpoint{where or ''}"
    first = text.strip().splitlines()[0] if text.strip() else err.__class__.__name__
    return f"{uri}: {first[:300]}"


IO_THREADS = 16
"""Object-store requests in flight at once when a step touches many files (each file is a round trip)."""


def makes_dirs(fs: pafs.FileSystem) -> bool:
    """Whether writing under a path on `fs` needs its directories made first (not on S3: no directories)."""
    return not isinstance(fs, pafs.S3FileSystem)


def map_io(fn: Callable[[Any], Any], items: list) -> list:
    """`fn` over `items` on IO_THREADS threads, so object-store round trips overlap; results in order."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with cf.ThreadPoolExecutor(max_workers=min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


@dataclass
class Storage:
    """Filesystem factory and small-object helpers for every URI the pipeline touches."""

    cfg: StorageSection

    def __post_init__(self) -> None:
        self._cache: dict[str, pafs.FileSystem] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg = state["cfg"]
        self._cache = {}

    # ------------------------------------------------------------------------------------ filesystems
    @property
    def endpoint(self) -> Optional[str]:
        return endpoint_from(self.cfg)

    def filesystem(self, uri: str) -> pafs.FileSystem:
        scheme = scheme_of(uri)
        if scheme not in self._cache:
            self._cache[scheme] = self._make_fs(scheme)
        return self._cache[scheme]

    def _make_fs(self, scheme: str) -> pafs.FileSystem:
        if scheme == "file":
            return pafs.LocalFileSystem()
        if scheme in ("s3", "s3a"):
            region = self.cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            kwargs: dict[str, Any] = dict(
                region=region or "us-east-1",
                connect_timeout=self.cfg.connect_timeout_s,
                request_timeout=max(30.0, self.cfg.connect_timeout_s),
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.cfg.retries),
            )
            endpoint = self.endpoint
            if endpoint:
                kwargs["endpoint_override"] = endpoint
                kwargs["scheme"] = "https" if endpoint.startswith("https://") else "http"
            return pafs.S3FileSystem(**kwargs)
        try:
            import fsspec

            fs = fsspec.filesystem(scheme)
        except (ImportError, ValueError) as e:
            raise StorageError(f"{scheme}:// is not supported here ({e})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs))

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path inside it) for a URI or local path."""
        uri = normalize_uri(uri)
        fs = self.filesystem(uri)
        if scheme_of(uri) == "file":
            return fs, uri
        path = strip_scheme(uri)
        return fs, path

    @contextlib.contextmanager
    def open_parquet(self, uri: str) -> Iterator["pq.ParquetFile"]:
        """The Parquet file at `uri`, its footer read (`.metadata`, `.schema_arrow`, `.read(columns=...)`,
        `.iter_batches(...)`); the file is closed when the block ends. Errors are pyarrow's, unchanged."""
        import pyarrow.parquet as pq

        fs, path = self.resolve(uri)
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f)

    # ------------------------------------------------------------------------------------ helpers
    def _wrap(self, uri: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(describe_os_error(e, uri, self.endpoint)) from None

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        info = self._wrap(uri, fs.get_file_info, path)
        return info.type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        info = self._wrap(uri, fs.get_file_info, path)
        return info.type == pafs.FileType.Directory

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)

        def _read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        return self._wrap(uri, _read)

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self.resolve(uri)

        def _write() -> None:
            parent = path.rsplit("/", 1)[0]
            if parent:
                fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(path) as f:
                f.write(data)

        self._wrap(uri, _write)

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri).decode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))

    def list_files(self, uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
        """Sorted URIs of the files under `uri` (hidden `_`/`.` names excluded), or [] if none."""
        uri = normalize_uri(uri)
        fs, path = self.resolve(uri)
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        infos = self._wrap(uri, fs.get_file_info, selector)
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(path):].lstrip("/")
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                continue
            if suffix and not info.path.endswith(suffix):
                continue
            out.append(join_uri(uri, rel))
        return sorted(out)

    def delete_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if self.exists(uri):
            self._wrap(uri, fs.delete_dir, path)

    def delete_file(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if self.exists(uri):
            self._wrap(uri, fs.delete_file, path)

    def move(self, src: str, dst: str) -> None:
        """Rename on local disk (atomic); copy then delete on object stores."""
        fs, spath = self.resolve(src)
        _, dpath = self.resolve(dst)
        parent = dpath.rsplit("/", 1)[0]

        def _move() -> None:
            if parent and makes_dirs(fs):
                fs.create_dir(parent, recursive=True)
            fs.move(spath, dpath)

        self._wrap(src, _move)

    def check_bucket(self, uri: str) -> None:
        """For s3:// URIs, fail fast when the endpoint is unreachable, credentials are refused or the bucket
        is missing (object reads in a missing bucket look like "no such file", which would mislead)."""
        uri = normalize_uri(uri)
        if scheme_of(uri) not in ("s3", "s3a"):
            return
        fs, path = self.resolve(uri)
        bucket = path.split("/", 1)[0]
        info = self._wrap(uri, fs.get_file_info, bucket)
        if info.type == pafs.FileType.NotFound:
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise StorageError(f"{uri}: bucket not found{where}")

    def check_writable(self, uri: str) -> None:
        """Fail fast (endpoint, credentials, bucket) by writing and deleting a marker under `uri`."""
        self.check_bucket(uri)
        probe = join_uri(normalize_uri(uri), "_write_check")
        self.write_bytes(probe, b"ok")
        self.delete_file(probe)
