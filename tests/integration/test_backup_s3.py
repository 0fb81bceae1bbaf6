"""Backups to a real S3 HTTP endpoint: moto's server on loopback, started by the test; boto3 talks HTTP to it,
directly or through a proxy that answers some requests with 503 SlowDown / 500 (raftblock/backup/store.py
rule 3: retried; docs/format/backup.md)."""

from __future__ import annotations

import http.client
import http.server
import random
import threading
from typing import Any

import pytest

from raftblock.backup import chunk
from raftblock.backup.store import S3Store, StoreError, open_store
from raftblock.backup.transfer import export_image, list_manifests, load_manifest, restore_bytes, verify
from raftblock.testing.serve import free_port

CH = chunk.CHUNK_BYTES
CREDS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the endpoint; every `every`-th request is answered 503 SlowDown or 500 instead."""

    def __init__(self, target_port: int, every: int) -> None:
        self.target_port = target_port
        self.every = every
        self.count = 0
        self.failed = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.count += 1
            fail = self.server.count % self.server.every == 0
            if fail:
                self.server.failed += 1
        if fail:
            code, err = random.choice([(503, "SlowDown"), (500, "InternalError")])
            msg = f"<Error><Code>{err}</Code><Message>injected</Message></Error>".encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body if body else None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


def _store(endpoint: str, url: str = "s3://backups/cluster1") -> S3Store:
    st = open_store(url, endpoint_url=endpoint, **CREDS)
    assert isinstance(st, S3Store)
    return st


def test_export_incremental_and_restore_through_s3(s3_endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="backups")
    store = _store(s3_endpoint)
    size = 6 * CH
    img = bytearray(random.Random(1).randbytes(size))
    img[CH : 2 * CH] = bytes(CH)
    r1 = export_image(store, "vol", "s1", size, lambda o, n: bytes(img[o : o + n]))
    assert r1.uploaded_objects == 5
    img[3 * CH + 8192 : 3 * CH + 12288] = b"\x07" * 4096
    r2 = export_image(store, "vol", "s2", size, lambda o, n: bytes(img[o : o + n]), since=r1.manifest,
                      changed=lambda k: k == 3)
    assert r2.manifest.chunks[3][0] == "delta" and r2.uploaded_objects == 1
    assert r2.uploaded_bytes < 2 * 4096 + 1024  # one block of change, compressed, plus the delta's header
    assert sorted(list_manifests(store)) == [("vol", "s1"), ("vol", "s2")]
    assert restore_bytes(store, load_manifest(store, "vol", "s2")) == img
    assert verify(store, load_manifest(store, "vol", "s1")) == []
    keys = {k for k, _s, _t in store.list("")}
    assert "manifests/vol/s2.json" in keys and not any(k.startswith("uploads/") for k in keys)


def test_an_export_through_500s_and_503s_completes(s3_endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="backups")
    proxy = _FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]), every=4)
    t = threading.Thread(target=proxy.serve_forever, daemon=True)
    t.start()
    try:
        store = _store(f"http://127.0.0.1:{proxy.server_address[1]}")
        size = 8 * CH
        img = bytearray(random.Random(2).randbytes(size))
        r = export_image(store, "vol", "s1", size, lambda o, n: bytes(img[o : o + n]))
        assert proxy.failed >= 5  # the errors did happen
        assert restore_bytes(_store(s3_endpoint), r.manifest) == img
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_missing_bucket_or_unreachable_endpoint_is_a_one_line_error(s3_endpoint: str) -> None:
    store = _store(s3_endpoint, "s3://no-such-bucket/x")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as ei:
        export_image(store, "vol", "s1", CH, lambda o, n: random.randbytes(n))
    assert "\n" not in str(ei.value)
    dead = S3Store("b", "p", endpoint_url=f"http://127.0.0.1:{free_port()}", attempts=2, timeout_s=2, **CREDS)
    with pytest.raises(StoreError) as ei:
        dead.exists("chunks/" + "0" * 64)
    assert "s3://b/p" in str(ei.value) and "\n" not in str(ei.value)
