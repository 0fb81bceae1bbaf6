"""Where backups live (docs/format/backup.md): an S3 bucket prefix or a directory, behind one small interface.

Rules:
1. `open_store(url)`: `s3://BUCKET/PREFIX` (boto3; endpoint, region and credentials from the arguments, else
   the standard AWS environment, `AWS_ENDPOINT_URL` included) or a path (a directory, made if missing).
2. Keys are relative to the prefix, '/'-separated (`chunks/<sha256>`). `put` is atomic: a reader sees the
   whole object or none (S3 by nature; a directory writes a temporary file, fsyncs it, renames, fsyncs the
   directory), so an export killed halfway leaves no half object under a real name.
3. Every failure is a StoreError with one line a human can act on (no such bucket, access denied,
   unreachable endpoint); `get` of a missing key is NotFound. Transient S3 errors (500, 503, throttling,
   timeouts) are retried by botocore's adaptive mode before they become errors.
4. `Throttled(store, bytes_per_s)` bounds the transfer rate, uploads and downloads (a token bucket shared by
   every thread; bursts of at most one second's worth).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol


class StoreError(OSError):
    """The store could not do it (I/O: unreachable, denied, missing): one line for the operator."""


class NotFound(StoreError):
    pass


class Store(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]: ...

    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or key.startswith("/"):
        raise ValueError(f"bad object key {key!r}")
    return key


class DirStore:
    """Rule 2 on a local (or mounted) file system."""

    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(path)
        self.url = self.root
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as a backup store: {e.strerror}") from e

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *_check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(d, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreError(f"cannot write {path}: {e.strerror}") from e

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise NotFound(f"{path}: no such object") from e
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """(key, size, modification time) of every object whose key starts with `prefix`, in key order."""
        base = self.root
        out = []
        top = os.path.join(base, *prefix.split("/")[:-1])  # only the directory the prefix names is walked
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                if ".tmp-" in f:
                    continue
                full = os.path.join(dirpath, f)
                key = os.path.relpath(full, base).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        st = os.stat(full)
                    except OSError:
                        continue
                    out.append((key, st.st_size, st.st_mtime))
        yield from sorted(out)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot delete {key}: {e.strerror}") from e


class S3Store:
    """Rule 1-3 on S3 (or anything that speaks its API: MinIO, Ceph RGW, moto's server)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None, timeout_s: float = 30.0,
                 attempts: int = 8) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:  # the `s3` extra
            raise StoreError("S3 needs boto3 (pip install 'raftblock[s3]')") from e
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        cfg = Config(retries={"max_attempts": attempts, "mode": "adaptive"}, connect_timeout=timeout_s,
                     read_timeout=timeout_s, signature_version="s3v4")
        kw: dict[str, Any] = {"config": cfg}
        if endpoint_url:
            kw["endpoint_url"] = endpoint_url
        if region:
            kw["region_name"] = region
        if access_key and secret_key:
            kw["aws_access_key_id"] = access_key
            kw["aws_secret_access_key"] = secret_key
        self._s3 = boto3.client("s3", **kw)
        from botocore.exceptions import BotoCoreError, ClientError
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)
        self._client_error = ClientError

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, e: Exception) -> StoreError:
        if isinstance(e, self._client_error):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = str(err.get("Message", "")) or code
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"{self.url}: {what}: no such object")
            if code == "NoSuchBucket":
                return StoreError(f"{self.url}: bucket {self.bucket!r} does not exist")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return StoreError(f"{self.url}: access denied ({code}): check the credentials")
            return StoreError(f"{self.url}: {what}: {code} {msg}".rstrip())
        return StoreError(f"{self.url}: {what}: {e}")

    def put(self, key: str, data: bytes) -> None:
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except self._errors as e:
            raise self._fail(f"put {key}", e) from e

    def get(self, key: str) -> bytes:
        try:
            r = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(r["Body"].read())
        except self._errors as e:
            raise self._fail(f"get {key}", e) from e

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self._errors as e:
            err = self._fail(f"head {key}", e)
            if isinstance(err, NotFound):
                return False
            raise err from e

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        full = (self.prefix + "/" if self.prefix else "") + prefix  # a prefix, not a key: may end in '/'
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][cut:], int(obj["Size"]), obj["LastModified"].timestamp()
        except self._errors as e:
            raise self._fail(f"list {prefix}", e) from e

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as e:
            raise self._fail(f"delete {key}", e) from e


class Throttled:
    """Rule 4."""

    def __init__(self, store: Store, bytes_per_s: float) -> None:
        self.store = store
        self.url = store.url
        self.rate = float(bytes_per_s)
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the bucket is next empty of debt

    def _take(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now - 1.0, self._next)  # at most one second of credit
            self._next = start + nbytes / self.rate
            wait = self._next - now - 1.0
        if wait > 0:
            time.sleep(wait)

    def put(self, key: str, data: bytes) -> None:
        self._take(len(data))
        self.store.put(key, data)

    def get(self, key: str) -> bytes:
        data = self.store.get(key)
        self._take(len(data))  # a restore's downloads, paced the same way
        return data

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        return self.store.list(prefix)

    def delete(self, key: str) -> None:
        self.store.delete(key)


def open_store(url: str, **s3: Any) -> DirStore | S3Store:
    """Rule 1. `s3`: endpoint_url, region, access_key, secret_key (else boto3's environment)."""
    if url.startswith("s3://"):
        rest = url[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"{url}: no bucket named")
        return S3Store(bucket, prefix, **s3)
    if "://" in url:
        raise StoreError(f"{url}: unknown scheme (s3://BUCKET/PREFIX or a directory path)")
    return DirStore(url)
