"""One writer per output prefix: a lease object at ``OUT/.cosed-lease.json``.

Taken with a create-if-absent write (S3 ``If-None-Match: *``, local ``O_EXCL``),
renewed by a background thread, released at the end. A lease whose holder
stopped renewing (past its expiry), or whose process on this host is gone, is
taken over, so a crashed job never blocks an output for longer than one lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from cosed import storage
from cosed.errors import UserError
from cosed.tasks import LEASE

log = logging.getLogger("cosed")


class LeaseHeld(UserError):
    """Another job is writing the same output prefix."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str | None
    token: str
    expires: float

    def describe(self) -> str:
        left = self.expires - time.time()
        job = f", Ray job {self.job}" if self.job else ""
        return (f"host {self.host}, pid {self.pid}{job}, lease expires "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.expires))} (in {left:.0f} s)")

    def gone(self) -> bool:
        """Past its expiry, or a process on this host that no longer exists."""
        if time.time() > self.expires:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def current_job_id() -> str | None:
    """The Ray job submission id when running under ``ray job submit``."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None


class OutputLease:
    """``with OutputLease(out, seconds):`` holds ``out`` for one writer, or raises `LeaseHeld`."""

    def __init__(self, out: str, seconds: float = 120.0):
        self.uri = storage.join(out, LEASE)
        self.seconds = seconds
        self.token = uuid.uuid4().hex
        self.tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        holder = Holder(host=socket.gethostname(), pid=os.getpid(), job=current_job_id(), token=self.token,
                        expires=time.time() + self.seconds)
        return (json.dumps(asdict(holder)) + "\n").encode()

    def acquire(self) -> "OutputLease":
        for _ in range(3):
            self.tag = storage.create_exclusive(self.uri, self._record())
            if self.tag:
                break
            try:
                data, tag = storage.read_tagged(self.uri)
            except FileNotFoundError:
                continue  # released between our two calls
            holder = _parse(data)
            if holder is not None and not holder.gone():
                raise LeaseHeld(f"another job is writing this output ({holder.describe()}): wait for it, "
                                f"stop it, or use another --out; its lease is {self.uri}")
            log.warning("taking over the lease of a job that is gone: %s",
                        holder.describe() if holder else "unreadable")
            self.tag = storage.replace_if(self.uri, self._record(), tag)
            if self.tag:
                break
        else:
            raise LeaseHeld(f"could not take the lease {self.uri}: other jobs keep taking it")
        self._thread = threading.Thread(target=self._renew, name="cosed-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                tag = storage.replace_if(self.uri, self._record(), self.tag)
                if tag:
                    self.tag = tag
                else:
                    log.error("the lease %s was taken by another job; this job's outputs may interleave", self.uri)
                    return
            except Exception as exc:  # keep trying: the storage may come back before the lease expires
                log.warning("could not renew the lease %s: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            storage.delete_if(self.uri, self.tag)
        except Exception as exc:  # an unreleased lease expires on its own
            log.warning("could not release the lease %s: %s", self.uri, exc)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
