"""One storage layer for local paths and ``s3://bucket/prefix`` URIs.

Writes are whole-object: a local file is written to a temporary name, synced
and renamed (the folder synced too), an S3 object is uploaded in one PUT, so a
reader never sees a partially written output at its final name, even after a
power loss.

S3 calls ride out outages: botocore's adaptive retries inside each call, and
around them a total-time budget (``configure(retry_seconds=...)``) with
backoff. Past the budget a `StorageUnavailable` names the endpoint; a missing
bucket, a refused access or missing credentials is a `StorageAccessError` at
once (waiting cannot fix those).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

from cosed.errors import UserError

T = TypeVar("T")

CONTENT_TYPES = {
    ".mp4": "video/mp4", ".png": "image/png", ".json": "application/json", ".jsonl": "application/x-ndjson",
    ".html": "text/html; charset=utf-8", ".csv": "text/csv; charset=utf-8", ".txt": "text/plain; charset=utf-8",
    ".safetensors": "application/octet-stream",
}
_ACCESS_CODES = {"NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "AccountProblem", "InvalidBucketName", "403"}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


class StorageAccessError(UserError):
    """The bucket is missing, access is refused or there are no credentials: retrying will not help."""


class StorageUnavailable(RuntimeError):
    """The storage endpoint did not answer within the retry budget."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> S3Location:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return S3Location(bucket=parsed.netloc, key=parsed.path.lstrip("/"))


def join(base: str, *parts: str) -> str:
    """Join path parts under a local folder or an S3 prefix."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def content_type(uri: str) -> str:
    return CONTENT_TYPES.get(Path(urlparse(str(uri)).path).suffix.lower(), "application/octet-stream")


_retry_seconds = float(os.environ.get("COSED_STORAGE_RETRY_SECONDS", 120.0))
_s3_client = None


def configure(retry_seconds: float) -> None:
    """Set the total time one storage call may spend retrying (seconds)."""
    global _retry_seconds, _s3_client
    if float(retry_seconds) != _retry_seconds:
        _retry_seconds = float(retry_seconds)
        _s3_client = None


_local = threading.local()


@contextmanager
def budget(seconds: float):
    """Storage calls in this thread retry for at most ``seconds`` (less than the run's budget): for calls
    that must finish or fail before a deadline, like a lease renewal or a fenced manifest write."""
    previous = getattr(_local, "budget", None)
    _local.budget = seconds
    try:
        yield
    finally:
        _local.budget = previous


def _budget() -> float:
    override = getattr(_local, "budget", None)
    return _retry_seconds if override is None else min(override, _retry_seconds)


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _is_aws(url: str | None) -> bool:
    return not url or (urlparse(url).hostname or "").endswith(".amazonaws.com")


def s3_client():
    """A boto3 client from the standard chain; endpoint from AWS_ENDPOINT_URL when set.

    Adaptive retries with client-side rate limiting; S3-compatible servers get
    checksums only where an operation requires them (several reject the new defaults).
    """
    global _s3_client
    if _s3_client is None:
        import boto3
        from botocore.config import Config

        url = os.environ.get("AWS_ENDPOINT_URL") or None
        options = dict(retries={"mode": "adaptive", "max_attempts": 5}, connect_timeout=5,
                       read_timeout=max(5.0, min(60.0, _retry_seconds)))
        if not _is_aws(url):
            options.update(request_checksum_calculation="when_required", response_checksum_validation="when_required")
        _s3_client = boto3.client("s3", endpoint_url=url, config=Config(**options))
    return _s3_client


def _s3_call(uri: str, call: Callable[..., T]) -> T:
    """Run one S3 call with the total-time retry budget; classify what cannot be retried."""
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError,
                                     NoCredentialsError, PartialCredentialsError, ResponseStreamingError)

    allowed = _budget()
    deadline = time.monotonic() + allowed
    delay = 0.5
    while True:
        try:
            return call(s3_client())
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StorageAccessError(f"no credentials for {uri}: {exc}") from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _ACCESS_CODES:
                raise StorageAccessError(f"{uri}: {code}: {error.get('Message', '')} (endpoint {endpoint()})") from exc
            if code not in _RETRY_CODES:
                raise
            problem: Exception = exc
        except (ConnectionError, HTTPClientError, ResponseStreamingError) as exc:
            problem = exc
        except BotoCoreError:
            raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StorageUnavailable(
                f"storage endpoint {endpoint()} did not answer within {allowed:g} s "
                f"(last error: {problem}); finished tasks are kept, run the same command again to resume") from problem
        time.sleep(min(delay, remaining))  # the last try lands at the deadline: the whole budget is used
        delay = min(2 * delay, 10.0)


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        loc = parse_s3(uri)

        def get(client):
            try:
                return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            except client.exceptions.NoSuchKey as exc:
                raise FileNotFoundError(uri) from exc

        return _s3_call(uri, get)
    return Path(uri).read_bytes()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        loc = parse_s3(uri)
        _s3_call(uri, lambda client: client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data,
                                                       ContentType=content_type(uri)))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


_PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _local_tag(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def create_exclusive(uri: str, data: bytes) -> str | None:
    """Write ``data`` only if nothing is at ``uri`` yet (S3 ``If-None-Match: *``, local ``O_EXCL``).

    Returns the new object's tag (for `replace_if` / `delete_if`), or None when something was there.
    """
    if is_s3(uri):
        loc = parse_s3(uri)

        def put(client):
            try:
                return client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*",
                                         ContentType=content_type(uri))["ETag"]
            except client.exceptions.ClientError as exc:
                if _error_code(exc) in _PRECONDITION:
                    return None
                raise

        return _s3_call(uri, put)
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        return None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_folder(path.parent)
    return _local_tag(data)


def read_tagged(uri: str) -> tuple[bytes, str]:
    """An object's bytes and its tag (S3 ETag, else a content hash)."""
    if is_s3(uri):
        loc = parse_s3(uri)

        def get(client):
            try:
                response = client.get_object(Bucket=loc.bucket, Key=loc.key)
            except client.exceptions.NoSuchKey as exc:
                raise FileNotFoundError(uri) from exc
            return response["Body"].read(), response["ETag"]

        return _s3_call(uri, get)
    data = Path(uri).read_bytes()
    return data, _local_tag(data)


def replace_if(uri: str, data: bytes, tag: str | None) -> str | None:
    """Overwrite only while the object still has ``tag`` (S3 ``If-Match``); the new tag, or None."""
    if is_s3(uri):
        loc = parse_s3(uri)

        def put(client):
            try:
                return client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=tag,
                                         ContentType=content_type(uri))["ETag"]
            except client.exceptions.ClientError as exc:
                if _error_code(exc) in _PRECONDITION + ("NoSuchKey", "404"):
                    return None
                raise

        return _s3_call(uri, put)
    try:
        if _local_tag(Path(uri).read_bytes()) != tag:
            return None
    except FileNotFoundError:
        return None
    write_bytes(uri, data)
    return _local_tag(data)


def delete_if(uri: str, tag: str | None) -> bool:
    """Remove an object only while it still has ``tag``."""
    if is_s3(uri):
        loc = parse_s3(uri)

        def remove(client):
            try:
                client.delete_object(Bucket=loc.bucket, Key=loc.key, IfMatch=tag)
                return True
            except client.exceptions.ClientError as exc:
                if _error_code(exc) in _PRECONDITION + ("NoSuchKey", "404"):
                    return False
                raise

        return _s3_call(uri, remove)
    try:
        if _local_tag(Path(uri).read_bytes()) != tag:
            return False
    except FileNotFoundError:
        return False
    Path(uri).unlink(missing_ok=True)
    return True


def delete(uri: str) -> None:
    """Remove one object or file; a missing one is fine."""
    if is_s3(uri):
        loc = parse_s3(uri)
        _s3_call(uri, lambda client: client.delete_object(Bucket=loc.bucket, Key=loc.key))
        return
    Path(uri).unlink(missing_ok=True)


def exists(uri: str) -> bool:
    if is_s3(uri):
        loc = parse_s3(uri)

        def head(client):
            try:
                client.head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except client.exceptions.ClientError as exc:
                if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

        return _s3_call(uri, head)
    return Path(uri).exists()


def size(uri: str) -> int | None:
    """An object's size in bytes, or None when there is none."""
    if is_s3(uri):
        loc = parse_s3(uri)

        def head(client):
            try:
                return int(client.head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
            except client.exceptions.ClientError as exc:
                if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return _s3_call(uri, head)
    try:
        return Path(uri).stat().st_size
    except FileNotFoundError:
        return None


def list_keys(prefix: str) -> list[str]:
    """Every object (or file) below a prefix, as full URIs, sorted."""
    if is_s3(prefix):
        loc = parse_s3(prefix)

        def listing(client):
            paginator = client.get_paginator("list_objects_v2")
            keys = []
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/" if loc.key else ""):
                keys += [f"s3://{loc.bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
            return keys

        return sorted(_s3_call(prefix, listing))
    root = Path(prefix)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def list_folders(prefix: str) -> set[str]:
    """The names of the folders right below a prefix (S3: one LIST per 1,000, by delimiter; the objects
    inside them are never listed)."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        base = loc.key.rstrip("/") + "/" if loc.key else ""

        def listing(client):
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=base, Delimiter="/")
            return {p["Prefix"][len(base):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])}

        return _s3_call(prefix, listing)
    root = Path(prefix)
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
