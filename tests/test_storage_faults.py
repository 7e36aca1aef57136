"""Storage errors: an unreachable endpoint, refused credentials or a missing bucket end a job in one line
naming the URI, exit code 2, within seconds and before Ray starts; transient errors (S3 throttling) are
retried `storage.retries` times, then fail with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.models import base_args
from tests.procs import assert_one_line_error, free_port, in_process, job_env, run_job, s3_client, wait_for_port


@pytest.fixture(scope="module")
def auth_s3_server():
    """A second moto server that checks credentials (ours are unknown to it, so every request is refused)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("fault", ["unreachable", "bad_credentials", "missing_bucket"])
@pytest.mark.parametrize("module", ["jobs.train", "jobs.score"])
def test_storage_errors_fail_fast_with_one_line(fault, module, s3_server, bucket, auth_s3_server, capsys):
    endpoint = {"unreachable": f"http://127.0.0.1:{free_port()}", "bad_credentials": auth_s3_server,
                "missing_bucket": s3_server}[fault]
    b = "no-such-bucket-here" if fault == "missing_bucket" else bucket
    start = time.monotonic()
    rc, _, err = in_process(module, base_args(endpoint, b, run="st"), capsys)
    elapsed = time.monotonic() - start
    needle = {"unreachable": "cannot reach the storage endpoint", "bad_credentials": "access denied",
              "missing_bucket": "bucket not found"}[fault]
    assert_one_line_error(rc, err, needle, f"s3://{b}/")
    assert elapsed < 60, f"took {elapsed:.0f}s to fail"


def test_unreachable_storage_exits_2_from_the_command_line(s3_server):
    """The whole process: exit code 2, one line, no Ray started, bounded time (bounded retries)."""
    start = time.monotonic()
    p = run_job("jobs.run", *base_args(f"http://127.0.0.1:{free_port()}", "somewhere"), env=job_env(s3_server),
                timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "cannot reach the storage endpoint")
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------------------------------ transient errors


class FlakyProxy:
    """A TCP proxy in front of the S3 server that answers the first `failures` connections with
    `503 Slow Down` (what S3 sends when throttling), then forwards bytes both ways."""

    def __init__(self, upstream_port: int, failures: int):
        import socket
        import threading

        self.upstream_port, self.failures, self.refused = upstream_port, failures, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                refuse = self.refused < self.failures
                self.refused += refuse
            if refuse:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _refuse(client) -> None:
        client.recv(65536)  # the request head
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        client.close()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_transient_storage_errors_are_retried_a_bounded_number_of_times(s3_server, bucket):
    from pipeline.config import StorageSection
    from pipeline.errors import StorageError
    from pipeline.storage import Storage

    port = int(s3_server.rsplit(":", 1)[1])
    proxy = FlakyProxy(port, failures=2)
    try:  # two throttled attempts, then the third of storage.retries=3 goes through
        st = Storage(StorageSection(endpoint_url=f"http://127.0.0.1:{proxy.port}", retries=3))
        st.write_bytes(f"s3://{bucket}/retry/ok.txt", b"hello")
        assert proxy.refused == 2
    finally:
        proxy.close()
    assert s3_client(s3_server).get_object(Bucket=bucket, Key="retry/ok.txt")["Body"].read() == b"hello"

    proxy = FlakyProxy(port, failures=1000)
    try:  # throttled for good: exactly storage.retries attempts, then one line naming the URI
        st = Storage(StorageSection(endpoint_url=f"http://127.0.0.1:{proxy.port}", retries=3))
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"s3://{bucket}/retry/never.txt: ") as e:
            st.read_bytes(f"s3://{bucket}/retry/never.txt")
        assert proxy.refused == 3
        assert "\n" not in str(e.value) and time.monotonic() - start < 30
    finally:
        proxy.close()
