"""One storage layer for local paths and ``s3://bucket/prefix`` URIs.

Writes are whole-object: a local file is written to a temporary name and
renamed, an S3 object is uploaded in one PUT, so a reader never sees a
partially written output at its final name.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


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


_s3_client = None


def s3_client():
    """A boto3 client from the standard chain; endpoint from AWS_ENDPOINT_URL when set."""
    global _s3_client
    if _s3_client is None:
        import boto3

        _s3_client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    return _s3_client


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            return s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except s3_client().exceptions.NoSuchKey as exc:
            raise FileNotFoundError(uri) from exc
    return Path(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        loc = parse_s3(uri)
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except s3_client().exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def list_keys(prefix: str) -> list[str]:
    """Every object (or file) below a prefix, as full URIs, sorted."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        paginator = s3_client().get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key.rstrip("/") + "/" if loc.key else ""):
            keys += [f"s3://{loc.bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        return sorted(keys)
    root = Path(prefix)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.exists() else []
