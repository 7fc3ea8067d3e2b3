"""Model calls from many processes to pools of model actors: power-of-two choices, timeouts, retries.

A driver's `Dispatcher` sends each call to the less loaded of two members drawn at
random from the pool, asking just those two for their queues (the actors count
calls claimed by any caller, so many drivers do not pile work on a few actors).
Work per call is constant, whatever the pool's size: two probes and one claim.
Membership comes with the task and is pushed to the driver when it changes: no
process serves every lookup. Every call carries a claim id; a claim is released
whenever its call does not run (cancelled, failed to resolve, actor gone) and
expires if its caller vanished, so queue counts cannot drift. Which actor serves
a call never changes its result: every model call is a pure function of its
request (`cosed.calls`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from cosed.distributed import telemetry
from cosed.distributed.policies import (call_patience, call_timeout, choose_actor, give_up, retry_backoff,
                                        sample_candidates)

log = logging.getLogger("cosed")

QUEUE_TIMEOUT_S = 1.0  # a probe unanswered this fast counts the actor as busy, and it is avoided for a while

# Failures of the serving actor or its node, or of the call's delivery: the call is tried again elsewhere.
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.TaskCancelledError,
             ray.exceptions.WorkerCrashedError)


class CallFailed(RuntimeError):
    """A model call failed on ``attempts`` actors in a row (or found no live actor)."""


class ObjectsLost(RuntimeError):
    """Objects a call reads or returns are gone with their node (candidate images of a removed SD node):
    sending the call again would send the same lost references, so the step is chosen again instead."""


def lost_object(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or wraps (a `RayTaskError` of an actor whose ``ray.get`` failed), a lost object
    (`ObjectLostError` and its subclasses, `OwnerDiedError` among them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ray.exceptions.ObjectLostError):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


def get_or_lost(ref, what: str):
    """``ray.get(ref)``, with a lost object raised as `ObjectsLost` (never retried as a call failure)."""
    try:
        return ray.get(ref)
    except Exception as exc:
        if lost_object(exc):
            raise ObjectsLost(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        raise


@dataclass(frozen=True)
class CallPolicy:
    """Timeouts and retries; ``expected`` seeds per-pool call seconds until some are measured."""

    timeout_factor: float = 10.0
    timeout_floor_s: float = 120.0
    attempts: int = 4
    restart_wait_s: float = 900.0  # how long a call waits for the only actors of a pool to come back
    probe_timeout_s: float = QUEUE_TIMEOUT_S  # a probe unanswered this fast counts the actor as busy
    expected: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, ray_cfg, expected: dict[str, float] | None = None) -> "CallPolicy":
        return cls(ray_cfg.call_timeout_factor, ray_cfg.call_timeout_floor_s, ray_cfg.call_attempts,
                   restart_wait_s=ray_cfg.start_timeout_s, expected=dict(expected or {}))

    def timeout(self, expected_s: float, queued: int = 0) -> float:
        """How long to wait for a call with ``queued`` calls ahead of it on the same actor."""
        return call_timeout(self.timeout_floor_s, self.timeout_factor, expected_s, queued)


class QueueCounter:
    """An actor's queue as every caller sees it: claims (made on the actor's control thread just before a
    call is sent, so they count while the model thread is busy) plus calls running.

    A claim ends when its call starts, when its caller releases it (the call was
    cancelled, its arguments could not be resolved, it timed out while queued), or
    after ``ttl_s`` (its caller died before either): the count never drifts upward.
    The claim and the call run on different threads, so a claim may arrive after its
    call started, or after its release: such late claims are not counted.
    """

    def __init__(self, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.claims: dict[str, float] = {}
        self.settled: dict[str, float] = {}  # calls started or released before their claim arrived
        self.running = 0
        self.ttl_s = ttl_s
        self.clock = clock
        self.lock = threading.Lock()

    def claim(self, call_id: str) -> None:
        with self.lock:
            if self.settled.pop(call_id, None) is None:
                self.claims[call_id] = self.clock()

    def _settle(self, call_id: str) -> None:
        if self.claims.pop(call_id, None) is None:
            self.settled[call_id] = self.clock()

    def release(self, call_id: str) -> None:
        with self.lock:
            self._settle(call_id)

    def start(self, call_id: str) -> None:
        with self.lock:
            self._settle(call_id)
            self.running += 1

    def finish(self) -> None:
        with self.lock:
            self.running = max(0, self.running - 1)

    @property
    def queued(self) -> int:
        with self.lock:
            now = self.clock()
            for table in (self.claims, self.settled):
                for call_id in [c for c, at in table.items() if now - at > self.ttl_s]:
                    del table[call_id]
            return len(self.claims) + self.running


@dataclass
class Membership:
    """The live members of each pool (kind -> {actor name: handle}) and measured seconds per call."""

    version: int
    members: dict[str, dict[str, Any]]
    expected: dict[str, float] = field(default_factory=dict)
    run_id: str = ""  # the `Pools` that made it: what its models answer holds for that run only


@dataclass
class Probes:
    """Dispatch messages sent, for the messages-per-call figures (`cosed plan`, tests)."""

    calls: int = 0
    probes: int = 0
    claims: int = 0
    releases: int = 0

    @property
    def per_call(self) -> float:
        return (self.probes + self.claims + self.releases) / self.calls if self.calls else 0.0


class Dispatcher:
    """Power-of-two-choices dispatch over pools of model actors, with timeouts and retries."""

    def __init__(self, membership: Membership, policy: CallPolicy, seed: int = 0):
        self.policy = policy
        self.membership = membership
        self.expected: dict[str, float] = {**policy.expected, **membership.expected}
        self.suspect: dict[str, float] = {}  # actor name -> until when it is avoided
        self.rng = random.Random(seed)
        self.updated = threading.Condition()
        self.probes = Probes()

    # -- membership -------------------------------------------------------------------------------
    def update(self, membership: Membership) -> None:
        """Newer members, pushed by the job (from another thread of the driver)."""
        with self.updated:
            if membership.version >= self.membership.version:
                self.membership = membership
                self.expected.update(membership.expected)
            self.updated.notify_all()

    def forget(self, name: str, seconds: float = 4.0) -> None:
        """Avoid an actor that failed or did not answer (it may be restarting) for a while."""
        self.suspect[name] = time.monotonic() + seconds

    def _members(self, kind: str) -> dict[str, Any]:
        """The pool's members; waits for the job to publish some when it has none (all being replaced)."""
        deadline = time.monotonic() + self.policy.restart_wait_s
        with self.updated:
            while not self.membership.members.get(kind):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CallFailed(f"no {kind} actor in the pool for {self.policy.restart_wait_s:.0f} s")
                self.updated.wait(min(left, 1.0))
            return self.membership.members[kind]

    # -- choosing ---------------------------------------------------------------------------------
    def pick(self, kind: str, avoid: set[str] = frozenset()) -> tuple[str, Any, int]:
        """(name, handle, calls queued there): of two members drawn at random (suspects and ``avoid`` only
        when nothing else is left), the one with the fewer calls queued, as the actors count them."""
        members = self._members(kind)
        names = list(members)
        now = time.monotonic()
        candidates = sample_candidates(names, lambda n: n in avoid or self.suspect.get(n, 0) > now, self.rng)
        if len(candidates) == 1:
            return candidates[0], members[candidates[0]], 0
        refs = {members[name].queued.remote(): name for name in candidates}
        self.probes.probes += len(refs)
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.policy.probe_timeout_s)
        queued = {}
        for ref in ready:
            try:
                queued[refs[ref]] = int(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        for name in set(candidates) - set(queued):
            self.forget(name)
        name = choose_actor(candidates, queued)
        return name, members[name], queued.get(name, 0)

    def expected_s(self, kind: str) -> float:
        return self.expected.get(kind, 1.0)

    # -- calling ----------------------------------------------------------------------------------
    def submit(self, kind: str, method: str, request, num_returns: int = 1, avoid: set[str] = frozenset()):
        """(refs, actor name, handle, call id, calls queued ahead): one call on the chosen member, not waited for."""
        name, handle, queued = self.pick(kind, avoid)
        call_id = uuid.uuid4().hex
        handle.claim.remote(call_id)  # counted on the control thread before the call queues behind others
        self.probes.claims += 1
        self.probes.calls += 1
        refs = handle.run.options(num_returns=num_returns).remote(call_id, method, request)
        return (refs if num_returns > 1 else [refs]), name, handle, call_id, queued

    def call(self, kind: str, method: str, request, num_returns: int = 1):
        return self.call_many(kind, method, [request], lambda _: num_returns)[0]

    def call_many(self, kind: str, method: str, requests: list, num_returns: Callable[[Any], int] = lambda _: 1,
                  ) -> list:
        """The results of ``method`` for each request (a list of refs where a request has several returns),
        each retried on another actor on failure (for at least ``attempts`` tries and the timeout floor).
        A wait ends after the policy's timeout: the call is then cancelled (if still queued) and sent elsewhere.
        A lost object (`lost_object`) raises `ObjectsLost` at once: resending would resend the lost references.
        """
        results: list = [None] * len(requests)
        failures: list[list[str]] = [[] for _ in requests]
        first_failure: dict[int, float] = {}
        pending: dict = {}  # last ref of a call -> (index, refs, actor, call id, handle, sent, deadline)

        def send(index: int) -> None:
            refs, name, handle, call_id, queued = self.submit(kind, method, requests[index],
                                                              num_returns(requests[index]), avoid=set(failures[index]))
            sent = time.monotonic()
            deadline = sent + self.policy.timeout(self.expected_s(kind), queued)
            pending[refs[-1]] = (index, refs, name, call_id, handle, sent, deadline)
            telemetry.record("cosed_pool_calls_in_flight", len(pending), pool=kind)

        for index in range(len(requests)):
            send(index)
        while pending:
            next_deadline = min(entry[-1] for entry in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, next_deadline - time.monotonic()))
            now = time.monotonic()
            expired = [ref for ref, entry in pending.items() if entry[-1] <= now and ref not in ready]
            for ref in ready + expired:
                index, refs, name, call_id, handle, sent, _ = pending.pop(ref)
                try:
                    if ref in expired:
                        _cancel(ref)
                        raise ray.exceptions.GetTimeoutError(f"{kind}.{method} did not answer in time")
                    value = get_or_lost(ref, f"{kind}.{method} on {name}")
                    results[index] = value if len(refs) == 1 else (refs[:-1], value)
                    telemetry.record("cosed_pool_call_seconds", time.monotonic() - sent, pool=kind)
                except RETRYABLE as exc:
                    if not isinstance(exc, ray.exceptions.RayActorError):
                        handle.release.remote(call_id)  # it never ran there (cancelled or never delivered)
                        self.probes.releases += 1
                    failures[index].append(name)
                    first_failure.setdefault(index, time.monotonic())
                    self.forget(name)
                    # Give up after ``attempts`` failures, but never before the floor has passed, nor while
                    # the actor is only restarting (reloading models can take minutes), nor while every member
                    # of the pool has died under this call (a node holding the whole pool left: the job replaces
                    # them after the same floor): a pool that is coming back must not fail the task.
                    pool_gone = isinstance(exc, ray.exceptions.RayActorError) and \
                        not set(self.membership.members.get(kind, {})) - set(failures[index])
                    patience = call_patience(pool_gone or isinstance(exc, ray.exceptions.ActorUnavailableError),
                                             self.policy.timeout_floor_s, self.policy.restart_wait_s)
                    if give_up(len(failures[index]), self.policy.attempts, time.monotonic() - first_failure[index],
                               patience):
                        raise CallFailed(f"{kind}.{method} failed on {len(failures[index])} attempts "
                                         f"(actors {', '.join(failures[index])}); last error: "
                                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
                    log.warning("%s.%s on %s failed (%s); retrying on another actor", kind, method, name,
                                type(exc).__name__)
                    telemetry.record("cosed_call_retries", 1, pool=kind)
                    time.sleep(retry_backoff(len(failures[index])))
                    send(index)
        telemetry.record("cosed_pool_calls_in_flight", 0, pool=kind)
        return results


def _cancel(ref) -> None:
    """Drop a call still queued at its actor; a running one ends only when the job kills a hung actor."""
    try:
        ray.cancel(ref)
    except Exception:  # not ours to cancel, or already finished
        pass
