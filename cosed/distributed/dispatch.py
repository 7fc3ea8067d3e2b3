"""Send each model call to the live actor of its pool with the least outstanding work.

Like `ray.util.ActorPool`, but load-aware, with a timeout on every wait and
retries on another actor. A `Dispatcher` lives in one process (a driver, a
writer, the job) and holds the pool members it was given; it asks the
`Directory` for fresh members only every ``refresh_s`` seconds or after a
failure, never once per call. Outstanding work is what the actors themselves
count (`QueueCounter`: calls claimed by any caller, less those finished), asked
of the pool's members in parallel when there is a choice: many drivers each
seeing only their own calls would pile work on some actors while others idle.
Which actor serves a call never changes its result: every model call is a pure
function of its arguments.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from cosed.distributed import telemetry

log = logging.getLogger("cosed")

# Failures of the serving actor or its node: the call is tried again elsewhere.
QUEUE_TIMEOUT_S = 1.0  # an actor whose control thread does not answer this fast is left out of the choice

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.TaskCancelledError,
             ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError)


class CallFailed(RuntimeError):
    """A model call failed on ``attempts`` actors in a row (or found no live actor)."""


@dataclass(frozen=True)
class CallPolicy:
    """Timeouts and retries; ``expected`` seeds per-pool call seconds until some are measured."""

    timeout_factor: float = 10.0
    timeout_floor_s: float = 120.0
    attempts: int = 4
    refresh_s: float = 2.0
    restart_wait_s: float = 900.0  # how long a call waits for the only actors of a pool to restart
    expected: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, ray_cfg, expected: dict[str, float] | None = None) -> CallPolicy:
        return cls(ray_cfg.call_timeout_factor, ray_cfg.call_timeout_floor_s, ray_cfg.call_attempts,
                   restart_wait_s=ray_cfg.start_timeout_s, expected=dict(expected or {}))

    def timeout(self, expected_s: float, queued: int = 0) -> float:
        """How long to wait for a call with ``queued`` calls of ours ahead of it on the same actor."""
        return max(self.timeout_floor_s, self.timeout_factor * expected_s * (1 + queued))


class QueueCounter:
    """An actor's queue as every caller sees it: calls claimed (by any dispatcher, just before
    sending) less calls finished. Claims run on the actor's control thread, so they count while
    the model thread is busy. A call cancelled while still queued stays counted until the actor
    restarts: the actor then looks one call busier than it is, never less busy."""

    def __init__(self):
        self.claimed = 0
        self.finished = 0

    def claim(self) -> None:
        self.claimed += 1

    def finish(self) -> None:
        self.finished += 1

    @property
    def queued(self) -> int:
        return max(0, self.claimed - self.finished)


@dataclass
class Membership:
    """What the `Directory` publishes: pool members by name, and measured seconds per call."""

    version: int
    members: dict[str, dict[str, Any]]  # kind -> {actor name: handle}
    expected: dict[str, float] = field(default_factory=dict)
    run_id: str = ""  # the `Pools` that published it: what its models answer holds for that run only


@dataclass
class _InFlight:
    kind: str
    name: str
    seconds: float  # expected seconds of work


class Dispatcher:
    """Least-outstanding-work dispatch over pools of model actors, with timeouts and retries."""

    def __init__(self, membership: Membership, policy: CallPolicy, directory=None, seed: int = 0):
        self.policy = policy
        self.directory = directory
        self.membership = membership
        self.expected: dict[str, float] = {**policy.expected, **membership.expected}
        self.in_flight: dict[Any, _InFlight] = {}
        self.suspect: dict[str, float] = {}  # actor name -> until when it is avoided
        self.seen_queue: dict[str, int] = {}  # actor name -> its queue when last asked (every caller's calls)
        self.turn = seed
        self.refreshed = time.monotonic()

    # -- membership -------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Newer members from the directory; on any trouble keep the ones we have."""
        if self.directory is None or (not force and time.monotonic() - self.refreshed < self.policy.refresh_s):
            return
        self.refreshed = time.monotonic()
        try:
            latest = ray.get(self.directory.get.remote(), timeout=10)
        except Exception as exc:  # a restarting directory must not stop the calls
            log.info("directory unavailable (%s); keeping %d known actors", type(exc).__name__, self._count())
            return
        if latest is not None and latest.version >= self.membership.version:
            self.membership = latest
            self.expected.update(latest.expected)

    def _count(self) -> int:
        return sum(len(m) for m in self.membership.members.values())

    def forget(self, name: str, seconds: float | None = None) -> None:
        """Avoid an actor that failed or timed out (it may be restarting) for a while."""
        self.suspect[name] = time.monotonic() + (seconds if seconds is not None else self.policy.refresh_s * 2)

    # -- choosing ---------------------------------------------------------------------------------
    def _reap(self) -> None:
        """Drop calls that have finished from the outstanding work (no data is fetched)."""
        if not self.in_flight:
            return
        refs = list(self.in_flight)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in done:
            self.in_flight.pop(ref, None)
        self._report()

    def _report(self) -> None:
        for kind in self.membership.members:
            telemetry.record("cosed_pool_calls_in_flight", sum(1 for c in self.in_flight.values() if c.kind == kind), pool=kind)

    def load(self, kind: str) -> dict[str, float]:
        """Outstanding expected seconds per member of ``kind`` (from this process's calls)."""
        loads = {name: 0.0 for name in self.membership.members.get(kind, {})}
        for call in self.in_flight.values():
            if call.kind == kind and call.name in loads:
                loads[call.name] += call.seconds
        return loads

    def queues(self, kind: str, names: list[str]) -> dict[str, int]:
        """Calls queued or running at each named actor, from every caller. One that does not answer
        within ``QUEUE_TIMEOUT_S`` (dead, restarting) is left out and avoided for a while, so later
        calls do not each wait for it."""
        members = self.membership.members[kind]
        refs = {members[name].queued.remote(): name for name in names}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=QUEUE_TIMEOUT_S)
        answers = {}
        for ref in ready:
            try:
                answers[refs[ref]] = int(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        for name in set(names) - set(answers):
            self.forget(name)
        self.seen_queue.update(answers)
        return answers

    def pick(self, kind: str, avoid: set[str] = frozenset()) -> str:
        """The member with the least outstanding work; suspects and ``avoid`` only when nothing else is left."""
        self.refresh()
        self._reap()
        loads = self.load(kind)
        waited = 0.0
        while not loads:  # a pool whose actors are all being replaced: wait for the job to publish new ones
            if waited >= self.policy.timeout_floor_s:
                raise CallFailed(f"no {kind} actor in the pool for {waited:.0f} s")
            time.sleep(self.policy.refresh_s)
            waited += self.policy.refresh_s
            self.refresh(force=True)
            loads = self.load(kind)
        now = time.monotonic()
        healthy = [n for n in loads if n not in avoid and self.suspect.get(n, 0) <= now]
        candidates = healthy or [n for n in loads if n not in avoid] or list(loads)
        if len(candidates) > 1:
            queued = self.queues(kind, candidates)
            if queued:  # every caller's work; an actor that did not answer only when none of the others can
                loads = {n: queued[n] * self.expected_s(kind) if n in queued else math.inf for n in candidates}
        self.turn += 1
        # Ties go round-robin from a per-process offset, so drivers do not all start on the same actor.
        order = {name: (i - self.turn) % len(candidates) for i, name in enumerate(sorted(candidates))}
        return min(candidates, key=lambda n: (loads[n], order[n]))

    def expected_s(self, kind: str) -> float:
        return self.expected.get(kind, 1.0)

    # -- calling ----------------------------------------------------------------------------------
    def submit(self, kind: str, method: str, *args, avoid: set[str] = frozenset()):
        """(ref, actor name): one call on the least-loaded member, not waited for."""
        name = self.pick(kind, avoid)
        handle = self.membership.members[kind][name]
        handle.claim.remote()  # the control thread counts it before the call queues behind others
        ref = getattr(handle, method).remote(*args)
        self.in_flight[ref] = _InFlight(kind, name, self.expected_s(kind))
        return ref, name

    def _queued(self, name: str) -> int:
        """Calls ahead of our latest one on ``name``: ours, or every caller's when the actor told us more."""
        ours = sum(1 for call in self.in_flight.values() if call.name == name) - 1
        return max(ours, self.seen_queue.get(name, 0))

    def call(self, kind: str, method: str, *args):
        return self.call_many(kind, method, [args])[0]

    def call_many(self, kind: str, method: str, arg_lists: list[tuple], submitted: list | None = None) -> list:
        """Results of ``method(*args)`` for each entry, each retried on another actor on failure
        (for at least ``attempts`` tries and ``timeout_floor_s`` seconds).

        ``submitted`` may hold refs already sent (by this or another process) for some entries;
        a failed one is sent again here. A wait ends after the policy's timeout: the call is then
        cancelled (if still queued) and sent elsewhere.
        """
        results: list = [None] * len(arg_lists)
        failures: list[list[str]] = [[] for _ in arg_lists]
        pending: dict = {}  # ref -> (index, actor name or None, deadline)
        first_failure: dict[int, float] = {}

        def send(index: int) -> None:
            ref, name = self.submit(kind, method, *arg_lists[index], avoid=set(failures[index]))
            pending[ref] = (index, name, time.monotonic() + self.policy.timeout(self.expected_s(kind),
                                                                               self._queued(name)))

        for index in range(len(arg_lists)):
            ref = (submitted or [None] * len(arg_lists))[index]
            if ref is None:
                send(index)
            else:
                pending[ref] = (index, None, time.monotonic() + self.policy.timeout(self.expected_s(kind),
                                                                                   len(arg_lists)))
        while pending:
            next_deadline = min(deadline for _, _, deadline in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, next_deadline - time.monotonic()))
            expired = [ref for ref, (_, _, deadline) in pending.items() if deadline <= time.monotonic()
                       and ref not in ready]
            for ref in ready + expired:
                index, name, _ = pending.pop(ref)
                self.in_flight.pop(ref, None)
                try:
                    if ref in expired:
                        _cancel(ref)
                        raise ray.exceptions.GetTimeoutError(f"{kind}.{method} did not answer in time")
                    results[index] = ray.get(ref)
                except RETRYABLE as exc:
                    failures[index].append(name or "?")
                    first_failure.setdefault(index, time.monotonic())
                    if name:
                        self.forget(name)
                    # Give up after ``attempts`` failures, but never before the floor has passed, nor while
                    # the actor is only restarting (reloading models can take minutes): a pool of one actor
                    # that is restarting must not fail the task.
                    patience = self.policy.restart_wait_s if isinstance(exc, ray.exceptions.ActorUnavailableError) \
                        else self.policy.timeout_floor_s
                    if len(failures[index]) >= self.policy.attempts and \
                            time.monotonic() - first_failure[index] >= patience:
                        raise CallFailed(f"{kind}.{method} failed on {len(failures[index])} attempts "
                                         f"(actors {', '.join(failures[index])}); last error: "
                                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
                    log.warning("%s.%s on %s failed (%s); retrying on another actor", kind, method, name,
                                type(exc).__name__)
                    time.sleep(min(0.2 * 2 ** len(failures[index]), 5.0))
                    self.refresh(force=True)
                    send(index)
        return results


def _cancel(ref) -> None:
    """Drop a call still queued at its actor; a running one ends only when the job kills a hung actor."""
    try:
        ray.cancel(ref)
    except Exception:  # not ours to cancel, or already finished
        pass
