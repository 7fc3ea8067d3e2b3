"""One storage layer for local paths and ``s3://bucket/prefix`` URIs.

Writes are whole-object: a local file is written to a temporary name, synced
and renamed (the folder synced too), an S3 object is uploaded in one PUT, so a
reader never sees a partially written output at its final name, even after a
power loss.

S3 calls ride out outages and throttling: botocore's adaptive retries inside
each call (client-side rate limiting once the endpoint throttles), and around
them jittered backoff within two budgets (`configure`). An endpoint that keeps
answering ``503 SlowDown`` (or 429, or a throttling code) only slows the run
down: it may do so for ``throttle_seconds`` (minutes) before a
`StorageThrottled` says so. Only one that does not answer (refused, timed out,
5xx other than SlowDown) for ``retry_seconds`` is an outage, a
`StorageUnavailable` naming the endpoint. A missing bucket, a refused access or
missing credentials is a `StorageAccessError` at once (waiting cannot fix
those). Every throttled answer in this process is noted (`under_pressure`), so
the job can hold back new work while the storage pushes back.
"""

from __future__ import annotations

import math
import os
import random
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
_UNREACHABLE_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "500", "502",
                      "503", "504"}
THROTTLED, UNREACHABLE, ACCESS, OTHER = "throttled", "unreachable", "access", "other"


class StorageAccessError(UserError):
    """The bucket is missing, access is refused or there are no credentials: retrying will not help."""


class StorageUnavailable(RuntimeError):
    """The storage endpoint did not answer within the retry budget."""


class StorageThrottled(StorageUnavailable):
    """The storage endpoint kept throttling (503 SlowDown) past the throttling budget: the run stops as in an
    outage, but the message says what happened."""


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
_throttle_seconds = float(os.environ.get("COSED_STORAGE_THROTTLE_SECONDS", 1800.0))
_s3_client = None


def configure(retry_seconds: float, throttle_seconds: float = 1800.0) -> None:
    """Set how long one storage call may retry: ``retry_seconds`` while the endpoint does not answer (an
    outage), ``throttle_seconds`` while it answers SlowDown (throttling)."""
    global _retry_seconds, _throttle_seconds, _s3_client
    _throttle_seconds = float(throttle_seconds)
    if float(retry_seconds) != _retry_seconds:
        _retry_seconds = float(retry_seconds)
        _s3_client = None


_local = threading.local()


@contextmanager
def budget(seconds: float, throttled: float | None = None):
    """Storage calls in this thread retry for at most ``seconds`` (less than the run's budget): for calls
    that must finish or fail before a deadline, like a lease renewal or a fenced write. ``throttled``: a
    longer bound while the endpoint only throttles (reads whose answer is judged when it arrives)."""
    previous = getattr(_local, "budget", None)
    _local.budget = (seconds, seconds if throttled is None else throttled)
    try:
        yield
    finally:
        _local.budget = previous


def budgets() -> tuple[float, float]:
    """(outage, throttling) seconds one call in this thread may retry."""
    override = getattr(_local, "budget", None)
    if override is None:
        return _retry_seconds, _throttle_seconds
    return min(override[0], _retry_seconds), min(override[1], _throttle_seconds)


def throttle_budget() -> float:
    return _throttle_seconds


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _is_aws(url: str | None) -> bool:
    return not url or (urlparse(url).hostname or "").endswith(".amazonaws.com")


def s3_client():
    """A boto3 client from the standard chain; endpoint from AWS_ENDPOINT_URL when set.

    Adaptive retries with client-side rate limiting; S3-compatible servers get
    checksums only where an operation requires them (several reject the new defaults).
    Every answer the client gets (retries inside a call included) feeds `under_pressure`.
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
        client = boto3.client("s3", endpoint_url=url, config=Config(**options))
        client.meta.events.register("needs-retry.s3", _note_answer)
        _s3_client = client
    return _s3_client


def is_throttling(status: int | None, code: str) -> bool:
    """Whether an S3 answer says "slow down": a throttling code botocore's adaptive mode knows (SlowDown,
    Throttling, RequestLimitExceeded, ...), HTTP 429, or a 503 without a body (S3's SlowDown to a HEAD,
    which botocore reports as code ``503``; a 503 that names another code is an outage)."""
    from botocore.retries.standard import ThrottledRetryableChecker

    return code in ThrottledRetryableChecker._THROTTLED_ERROR_CODES or status == 429 or code in ("429", "503")


def classify(exc: BaseException) -> str:
    """`THROTTLED`, `UNREACHABLE` (refused, dropped, timed out, 5xx other than SlowDown), `ACCESS` (waiting
    cannot help) or `OTHER` (not a storage problem: raised as it is)."""
    from botocore.exceptions import (ClientError, ConnectionError, HTTPClientError, NoCredentialsError,
                                     PartialCredentialsError, ResponseStreamingError)

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ACCESS
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _ACCESS_CODES:
            return ACCESS
        if is_throttling(status, code):
            return THROTTLED
        return UNREACHABLE if code in _UNREACHABLE_CODES or (status or 0) >= 500 else OTHER
    if isinstance(exc, (ConnectionError, HTTPClientError, ResponseStreamingError)):
        return UNREACHABLE
    return OTHER


@dataclass
class _Answers:
    """When this process last got a throttled answer and an unthrottled one (monotonic seconds)."""

    throttled: float = -math.inf
    answered: float = -math.inf


_answers = _Answers()
PRESSURE_CALM_S = 5.0  # pressure ends this long after the last throttled answer, once an answer got through


def _note_answer(response=None, **_) -> None:
    """botocore's ``needs-retry`` hook: every HTTP answer, before botocore decides to retry it."""
    if response is None:
        return  # no answer at all (connection refused or dropped): an outage, not pressure
    http, parsed = response
    error = (parsed or {}).get("Error", {})
    status = getattr(http, "status_code", None)
    if is_throttling(status, str(error.get("Code", ""))):
        _answers.throttled = time.monotonic()
    else:
        _answers.answered = time.monotonic()


def pressure(throttled: float, answered: float, now: float, calm_s: float = PRESSURE_CALM_S) -> bool:
    """Whether the storage pushes back: throttled answers lately, and none let through since, or not for
    ``calm_s`` (so a storm's last throttled answer does not end it at once)."""
    return throttled > answered or now - throttled < calm_s


def under_pressure() -> bool:
    """Whether this process's storage calls are being throttled now (see `pressure`)."""
    return pressure(_answers.throttled, _answers.answered, time.monotonic())


def probe(prefix: str, seconds: float = 5.0) -> None:
    """One small request under ``prefix`` (a one-key listing): its answers feed `under_pressure` like every
    other call's; whatever it raises is dropped (the run's own calls report outages)."""
    if not is_s3(prefix):
        return
    loc = parse_s3(prefix)
    try:
        with budget(seconds):
            _s3_call(prefix, lambda client: client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1))
    except Exception:
        pass


_jitter = random.Random()  # its own generator: no output byte depends on the global one's state


def _s3_call(uri: str, call: Callable[..., T]) -> T:
    """Run one S3 call within the outage and throttling budgets, with jittered backoff; classify what
    cannot be retried."""
    outage, throttling = budgets()
    started = time.monotonic()
    silent_since: float | None = None  # when the current run of unanswered tries began
    tries = 0
    while True:
        tried = time.monotonic()
        try:
            return call(s3_client())
        except Exception as exc:
            kind = classify(exc)
            if kind == ACCESS:
                raise StorageAccessError(_describe(uri, exc)) from exc
            if kind == OTHER:
                raise
            problem = exc
        now = time.monotonic()
        tries += 1
        if kind == THROTTLED:
            silent_since = None
            remaining = started + throttling - now
            if remaining <= 0:
                raise StorageThrottled(
                    f"storage endpoint {endpoint()} kept answering 503 SlowDown (throttling) for "
                    f"{now - started:.0f} s, past storage.throttle_seconds ({throttling:g} s); finished tasks are "
                    "kept, run the same command again to resume") from problem
        else:
            silent_since = tried if silent_since is None else silent_since
            remaining = min(silent_since + outage, started + max(outage, throttling)) - now
            if remaining <= 0:
                raise StorageUnavailable(
                    f"storage endpoint {endpoint()} did not answer within {outage:g} s (last error: {problem}); "
                    "finished tasks are kept, run the same command again to resume") from problem
        # Jittered (many writers back off at once, they must not retry in step); the last try lands at the deadline.
        time.sleep(min(_jitter.uniform(0.5, 1.0) * min(0.5 * 2 ** tries, 10.0), remaining))


def _describe(uri: str, exc: BaseException) -> str:
    error = getattr(exc, "response", {}).get("Error")
    if error is None:
        return f"no credentials for {uri}: {exc}"
    return f"{uri}: {error.get('Code', '')}: {error.get('Message', '')} (endpoint {endpoint()})"


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
