"""One writer per output prefix: a lease object at ``OUT/.cosed-lease.json``.

Taken with a create-if-absent write (S3 ``If-None-Match: *``, local ``O_EXCL``),
renewed by a background thread, released at the end. A lease whose holder
stopped renewing (past its expiry), or whose process on this host is gone, is
taken over, so a crashed job never blocks an output for longer than one lease.

The lease fences: each renewal may take at most an eighth of the lease, and a job
counts its lease as held only until half a lease before the expiry it last wrote.
Past that (storage away, or another job took it over) `OutputLease.check` raises
`LeaseLost` and the job stops; every output write of a task (scenes, clips, video,
storyboard, manifest) goes through `LeaseFence.write`, which reads the lease object,
wants this job's token with at least half a lease left, and gives the write at most a
quarter of a lease. So a job that cannot renew writes nothing once another job could
take over.

Throttling is not an outage: while the storage answers SlowDown the renewal keeps
trying (`If-Match` on its own tag, so it succeeds only if no other job took the lease
meanwhile) for up to ``storage.throttle_seconds``, and a fence that finds the lease
still this job's but short waits for that renewal instead of stopping the run.
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


class LeaseLost(RuntimeError):
    """This job no longer holds its output's lease: another job may take it over, so nothing more is written."""


def _margin(seconds: float) -> float:
    return seconds / 2


@dataclass(frozen=True)
class LeaseFence:
    """What a writer checks just before a manifest write (picklable: it travels to Ray writers)."""

    uri: str
    token: str
    seconds: float

    def __call__(self) -> None:
        give_up = time.monotonic() + storage.throttle_budget()
        while True:
            # Judged when the answer arrives, so a read slowed down by throttling may take the throttling budget.
            with storage.budget(self.seconds / 8, throttled=storage.throttle_budget()):
                try:
                    holder = _parse(storage.read_bytes(self.uri))
                except FileNotFoundError:
                    holder = None
            left = holder.expires - time.time() if holder else 0.0
            if holder is not None and holder.token == self.token and left >= _margin(self.seconds):
                return
            # Still ours but short: its renewal may be held up by throttling. Waiting is safe (nothing is written
            # until a read shows it renewed); it is worth it while the lease has not expired or the storage throttles.
            if holder is None or holder.token != self.token or time.monotonic() > give_up \
                    or not (left > 0 or storage.under_pressure()):
                raise LeaseLost(f"the output lease {self.uri} is no longer this job's (or expires in {left:.0f} s): "
                                "nothing more is written; finished tasks are kept, run again to resume")
            time.sleep(min(5.0, self.seconds / 16))

    def write(self, uri: str, data: bytes) -> None:
        """Write one output after the check, bounded so it cannot land after the lease could pass on; a
        write cut short by throttling is checked and tried again (within the throttling budget)."""
        give_up = time.monotonic() + storage.throttle_budget()
        while True:
            self()
            try:
                with storage.budget(self.seconds / 4):
                    storage.write_bytes(uri, data)
                return
            except storage.StorageThrottled:
                if time.monotonic() > give_up:
                    raise


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
        return not _process_alive(self.pid)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host. A killed process its parent has not reaped yet (a zombie: what
    `ray job stop` leaves until the job supervisor exits) holds nothing and counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: the signal check is all there is
    return state not in (b"Z", b"X")


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
        self.held_until = 0.0  # monotonic: half a lease before the expiry last written
        self.lost: str | None = None
        self.throttled_since: float | None = None  # monotonic: when renewals began failing from throttling

    def _record(self) -> bytes:
        holder = Holder(host=socket.gethostname(), pid=os.getpid(), job=current_job_id(), token=self.token,
                        expires=time.time() + self.seconds)
        return (json.dumps(asdict(holder)) + "\n").encode()

    def acquire(self) -> "OutputLease":
        started = time.monotonic()
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
        self._confirmed(started)
        self._thread = threading.Thread(target=self._renew, name="cosed-lease", daemon=True)
        self._thread.start()
        return self

    def _confirmed(self, written_at: float) -> None:
        self.held_until = written_at + self.seconds - _margin(self.seconds)

    def _renew(self) -> None:
        wait = self.seconds / 8
        while not self._stop.wait(wait):
            attempt = time.monotonic()
            wait = self.seconds / 8
            try:
                with storage.budget(self.seconds / 8):
                    tag = storage.replace_if(self.uri, self._record(), self.tag)
            except storage.StorageThrottled as exc:  # the storage answers: try again soon, the lease is kept
                self.throttled_since = self.throttled_since or attempt
                log.warning("could not renew the lease %s (throttled): %s", self.uri, exc)
                wait = 1.0
                continue
            except Exception as exc:  # keep trying: the storage may come back while the lease is held
                self.throttled_since = None
                log.warning("could not renew the lease %s: %s", self.uri, exc)
                continue
            self.throttled_since = None
            if not tag:
                self.lost = f"the lease {self.uri} was taken over by another job"
                log.error("%s; this job stops writing", self.lost)
                return
            self.tag = tag
            self._confirmed(attempt)

    def check(self) -> None:
        """Raise `LeaseLost` once the lease may no longer be this job's. While renewals fail only because the
        storage throttles, the job goes on (its writes are fenced) up to the throttling budget."""
        if self.lost:
            raise LeaseLost(f"{self.lost}: no more manifests are written; finished tasks are kept")
        now = time.monotonic()
        if now > self.held_until and not (self.throttled_since is not None
                                          and now - self.throttled_since < storage.throttle_budget()):
            raise LeaseLost(f"could not renew the output lease {self.uri} in time (storage {storage.endpoint()} "
                            "unreachable?): no more manifests are written; finished tasks are kept, run again "
                            "to resume")

    @property
    def fence(self) -> LeaseFence:
        return LeaseFence(self.uri, self.token, self.seconds)

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
