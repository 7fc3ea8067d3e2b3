"""The job's coordination as a pure state machine: events in, actions out, no Ray, no clock.

A task's life (one attempt at a time)::

    QUEUED ─► CAPTIONING ─► READY ─► SEQUENCING ─► RENDERING ─► WRITE_READY ─► WRITING ─► DONE
       ▲           (lm only)              │             │              │            │
       └──────── retry (driver or writer lost, deadline) ─┴──────────────┴────────────┘   ─► FAILED

A driver chooses the task's scenes and reports each one as a `ClipRequest`; the
job (this core) sends every clip call itself, so a clip never depends on the
driver that asked for it (a driver's death costs only the task it sequences).
Clips are bound to a video actor late: each actor holds at most ``clip_depth``
of them and the rest wait here, oldest first, for the first actor that frees
(`slots.Slots`), so the run's last clips never queue behind others.
Clip calls are keyed by the clip's URI (task fingerprint, step, scene hash): a later
attempt of the same task joins the call already running instead of rendering
again. Once a task is sequenced and all its clips are stored, a writer
assembles it from storage. Storage gone past its budget, or the output lease
lost, stops all admission; the runtime then ends the run. Storage that pushes
back (throttling) only pauses it: no task starts and one writer runs until the
pressure ends (`on_storage_pressure`).

Every operation on an event is O(1) amortised (dicts, a deque, a heap with lazy
deletion), so the job's work per event does not grow with the tasks in flight. The
core holds a window of tasks, not the dataset: the runtime adds tasks as `room`
allows and says `end_of_input` when the input has no more; a finished task's record
is dropped (its id stays in ``done`` or ``failed``), so memory follows the window.
`cosed.distributed.job` drives this with Ray events; `cosed.distributed.simulator`
drives the same class in virtual time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cosed.calls import ClipDone, ClipRequest
from cosed.captioner import window_context
from cosed.distributed.policies import (Admission, avoid_after_failure, call_patience, call_timeout, choose_actor,
                                        give_up, retry_backoff, sample_candidates)
from cosed.distributed.slots import Slots
from cosed.lease import LeaseLost
from cosed.storage import StorageUnavailable
from cosed.tasks import Task

log = logging.getLogger("cosed")

QUEUED, CAPTIONING, READY, SEQUENCING, RENDERING, WRITE_READY, WRITING, DONE, FAILED = (
    "queued", "captioning", "ready", "sequencing", "rendering", "write_ready", "writing", "done", "failed")
STATES = (QUEUED, CAPTIONING, READY, SEQUENCING, RENDERING, WRITE_READY, WRITING, DONE, FAILED)
PAST_SEQUENCING = (RENDERING, WRITE_READY, WRITING)


# -- what the runtime tells the core -------------------------------------------------------------------

@dataclass(frozen=True)
class Sequenced:
    """A driver's last event for a task: every scene is chosen and the sequence record is stored.
    ``probes``: the task's model calls and the dispatch messages they took (calls, probes, claims, releases)."""

    steps: int
    probes: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class ClipFound:
    """A driver found the scene's clip already stored (a retry or a resume)."""

    request: ClipRequest


@dataclass(frozen=True)
class DriverFailed:
    """The task failed inside its driver: ``kind`` is ``storage``, ``calls`` (model calls kept failing),
    ``lost`` (objects a step needed went with their node: retried, the retry resumes at that step) or
    ``error`` (anything else, a bad input say)."""

    kind: str
    message: str


# -- what the core asks the runtime to do ---------------------------------------------------------------

@dataclass(frozen=True)
class StartTask:
    driver: int
    key: tuple[str, int]  # (task id, attempt)
    task: Task
    captions: list[str]
    fingerprint: str


@dataclass(frozen=True)
class SendClip:
    call: int
    actor: str
    request: ClipRequest
    timeout_s: float


@dataclass(frozen=True)
class CancelClip:
    call: int


@dataclass(frozen=True)
class StartWriter:
    key: tuple[str, int]
    task: Task
    fingerprint: str
    started: float


@dataclass(frozen=True)
class CancelWriter:
    key: tuple[str, int]


@dataclass(frozen=True)
class ReplaceDriver:
    """Kill the driver (if it lives) and start a fresh one in its slot."""

    driver: int


@dataclass(frozen=True)
class SendCaptions:
    batch: int
    actor: str
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RecordFailure:
    task_id: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """End the run now (storage gone, lease lost): ``reason`` is raised once the run has wound down."""

    reason: BaseException


@dataclass(frozen=True)
class Retrying:
    task_id: str
    reason: str
    attempt: int


# -- state -----------------------------------------------------------------------------------------

@dataclass
class TaskRun:
    task: Task
    fingerprint: str
    captions: list[str] | None
    attempt: int = 0
    state: str = QUEUED
    started: float = 0.0
    driver: int | None = None
    sequenced: bool = False
    pending: set[str] = field(default_factory=set)  # clip URIs this attempt still waits for
    clips: set[str] = field(default_factory=set)  # every clip URI of this attempt
    scenes: int = 0  # scenes chosen in this attempt
    caption_failures: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.task.id, self.attempt)


@dataclass
class ClipCall:
    request: ClipRequest
    waiting: set[str]  # task ids
    call: int = 0
    actor: str | None = None
    tried: list[str] = field(default_factory=list)
    first_failure: float | None = None


@dataclass(frozen=True)
class CorePolicy:
    """The numbers the core decides with (`CallPolicy` and `RayConfig` give them)."""

    task_retries: int = 2
    sequence_deadline_s: float = 3600.0  # an attempt's sequencing (its driver's work, from its start)
    write_deadline_s: float = 1800.0  # a writer's work, from its start (never the wait for a writer slot)
    call_attempts: int = 4
    call_patience_s: float = 120.0  # a clip call is failed only after this long and ``call_attempts`` tries
    restart_patience_s: float = 900.0  # ... or this long while its actor is only restarting (reloading)
    timeout_floor_s: float = 120.0
    timeout_factor: float = 10.0
    clip_seconds: float = 1.0  # expected seconds of one clip call (measured ones replace it)
    caption_batch: int = 8  # pairs per caption call: one generate call of the captioner
    clip_depth: int = 2  # clips on one video actor at once (one running, one ready); the rest wait in the job

    def clip_timeout(self, queued_ahead: int) -> float:
        return call_timeout(self.timeout_floor_s, self.timeout_factor, self.clip_seconds, queued_ahead)


class JobCore:
    """Tasks, drivers, clip calls, captions and writers of one run (see the module docstring)."""

    def __init__(self, tasks: list[tuple[Task, str, list[str] | None]], drivers: int, admission: Admission,
                 policy: CorePolicy, seed: int = 0, more: bool = False):
        """``tasks``: (task, fingerprint, captions or None to caption) to start with, in the order to run them;
        ``more``: whether the runtime will `add` more (it then calls `end_of_input` once it has none)."""
        self.policy = policy
        self.admission = admission
        self.tasks: dict[str, TaskRun] = {}  # the window: tasks added and not yet done or failed
        self.queue: deque[str] = deque()
        self.to_caption: deque[str] = deque()
        self.idle: list[int] = list(range(drivers))
        self.counts = dict.fromkeys(STATES, 0)
        self.added = 0
        self.more = more
        self.clips: dict[str, ClipCall] = {}  # clip URI -> the call that makes it
        self.calls: dict[int, str] = {}  # call id -> clip URI (the current submission only)
        self.done_clips: set[str] = set()
        self.members: dict[str, list[str]] = {"video": [], "caption": []}
        self.load: dict[str, int] = {}  # caption actor -> calls this core has outstanding on it
        self.slots = Slots(policy.clip_depth)  # video actors' room: clips are bound to one as it frees
        self.ids = itertools.count(1)
        self.rng = random.Random(seed)
        self.timers: list[tuple[float, int, str, Any]] = []
        self.held: deque[str] = deque()  # clip URIs waiting for a video actor's room (new and resent), oldest first
        self.captioning: dict[int, tuple[str, list[tuple[str, int]]]] = {}  # batch -> (actor, (task id, step))
        self.caption_waiting: deque[tuple[str, int]] = deque()
        self.caption_avoid: dict[tuple[str, int], str] = {}  # (task id, step) -> the actor its last call failed on
        self.writing: dict[tuple[str, int], str] = {}  # writer key -> task id
        self.write_ready: deque[str] = deque()
        self.stopped: BaseException | None = None
        self.done: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.scenes_chosen = 0
        self.scenes_written = 0
        self.pressure_since: float | None = None  # storage pushing back since (admission paused)
        self.storage_pauses = 0
        self.storage_paused_s = 0.0
        self.events = 0  # handled (for the work-per-event figures)
        self.add(tasks)

    # -- the window ----------------------------------------------------------------------------------
    def add(self, tasks: list[tuple[Task, str, list[str] | None]]) -> None:
        """More tasks, in the order to run them (the runtime calls `_admit` through its next event or tick)."""
        for task, fingerprint, captions in tasks:
            if task.id in self.tasks:
                raise ValueError(f"task {task.id} is already in the run")
            self.tasks[task.id] = TaskRun(task, fingerprint, captions)
            (self.queue if captions is not None else self.to_caption).append(task.id)
        self.counts[QUEUED] += len(tasks)
        self.added += len(tasks)

    def end_of_input(self) -> None:
        self.more = False

    @property
    def live(self) -> int:
        """Tasks in the window: added, neither done nor failed."""
        return len(self.tasks)

    def room(self, window: int) -> int:
        """How many tasks the runtime may add now to keep ``window`` in the core (none once stopped)."""
        return 0 if self.stopped is not None or not self.more else max(0, window - self.live)

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return (not self.more and not self.tasks) or (self.stopped is not None and not self.writing)

    def _move(self, run: TaskRun, state: str) -> None:
        self.counts[run.state] -= 1
        self.counts[state] += 1
        run.state = state
        if state in (DONE, FAILED):
            self.tasks.pop(run.task.id, None)  # out of the window: late events for it find nothing and are dropped

    def _timer(self, at: float, kind: str, key: Any) -> None:
        heapq.heappush(self.timers, (at, next(self.ids), kind, key))

    def next_timer(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    @property
    def to_sequence(self) -> int:
        """Tasks in the window still to sequence: what keeps the SD pool busy once the input is read."""
        return sum(self.counts[s] for s in (QUEUED, CAPTIONING, READY, SEQUENCING))

    @property
    def past_sequencing(self) -> int:
        return sum(self.counts[s] for s in PAST_SEQUENCING)

    # -- entry points ----------------------------------------------------------------------------------
    def start(self, now: float) -> list:
        return self._admit(now)

    def on_members(self, kind: str, names: list[str], now: float) -> list:
        """The live members of a pool the job itself sends calls to (video, caption)."""
        self.members[kind] = list(names)
        if kind == "video":
            self.slots.set_members(names)
        for name in names:
            self.load.setdefault(name, 0)
        return self._admit(now)

    def on_storage_pressure(self, active: bool, now: float) -> list:
        """The storage began or ceased to push back (SlowDown): pause or resume admission."""
        if active and self.pressure_since is None:
            self.pressure_since = now
            self.storage_pauses += 1
            log.warning("storage is throttling (SlowDown): no task starts and one writer runs until it eases")
        elif not active and self.pressure_since is not None:
            self.storage_paused_s += now - self.pressure_since
            log.warning("storage no longer throttling after %.0f s: admission resumes", now - self.pressure_since)
            self.pressure_since = None
        return self._admit(now)

    def sequencing(self, driver: int, key: tuple[str, int]) -> bool:
        """Whether ``driver`` sequences attempt ``key`` now (the runtime polls a driver only while it does)."""
        run = self.tasks.get(key[0])
        return run is not None and run.key == key and run.state == SEQUENCING and run.driver == driver

    def on_driver_events(self, driver: int, events: list[tuple[tuple[str, int], Any]], now: float) -> list:
        """A driver's events, each tagged with the attempt (task id, attempt) that made it. Filtered one by one:
        a poll outstanding on a slot when its attempt was given up may answer with the next attempt's events,
        which belong to that attempt; events of an attempt already given up (deadline, retry) are dropped."""
        self.events += 1
        actions: list = []
        for key, event in events:
            if not self.sequencing(driver, key):
                continue
            run = self.tasks[key[0]]  # `sequencing` found it
            if isinstance(event, ClipRequest):
                run.scenes += 1
                self.scenes_chosen += 1
                actions += self._need_clip(run, event, now)
            elif isinstance(event, ClipFound):
                run.scenes += 1
                self.scenes_chosen += 1
                run.clips.add(event.request.clip)
                self.done_clips.add(event.request.clip)
            elif isinstance(event, Sequenced):
                run.sequenced = True
                run.driver = None
                self.idle.append(driver)
                self._move(run, RENDERING)
                self._maybe_ready_to_write(run)
            elif isinstance(event, DriverFailed):
                run.driver = None
                self.idle.append(driver)
                if event.kind == "storage":
                    actions += self._stop(StorageUnavailable(event.message))
                    self._fail(run, event.message, actions)
                elif event.kind == "lost":
                    self._retry_or_fail(run, f"objects lost: {event.message}", actions)
                else:
                    reason = f"model calls kept failing: {event.message}" if event.kind == "calls" else event.message
                    self._fail(run, reason, actions)
        return actions + self._admit(now)

    def on_driver_lost(self, driver: int, key: tuple[str, int], reason: str, now: float) -> list:
        """The driver's process or node is gone (not a failure inside the task)."""
        self.events += 1
        run = self.tasks.get(key[0])
        if run is None or run.key != key or run.state != SEQUENCING or run.driver != driver:
            return []
        run.driver = None
        self.idle.append(driver)
        actions: list = [ReplaceDriver(driver)]
        self._retry_or_fail(run, reason, actions)
        return actions + self._admit(now)

    def on_clip_result(self, call: int, done: ClipDone | None, error: str | None, message: str, now: float) -> list:
        """A clip call answered: ``done``, or ``error`` = ``retry`` (actor lost, timed out, cancelled),
        ``restarting`` (its actor is reloading), ``storage`` or ``fatal`` (the call itself failed)."""
        self.events += 1
        uri = self.calls.pop(call, None)
        if uri is None:
            return []
        clip = self.clips[uri]
        self._unload(clip)
        actions: list = []
        if done is not None:
            self._clip_done(uri, actions)
        elif error in ("retry", "restarting"):
            clip.tried.append(clip.actor or "?")
            clip.first_failure = clip.first_failure if clip.first_failure is not None else now
            if give_up(len(clip.tried), self.policy.call_attempts, now - clip.first_failure, call_patience(
                    error == "restarting", self.policy.call_patience_s, self.policy.restart_patience_s)):
                self._clip_failed(uri, f"video calls kept failing: {len(clip.tried)} attempts "
                                       f"(actors {', '.join(clip.tried)}); last error: {message}", actions)
            else:
                log.warning("clip %s (task %s, step %d) failed on %s (%s); sending it to another actor",
                            uri, clip.request.task_id, clip.request.step, clip.actor, message)
                clip.actor = None
                self._timer(now + retry_backoff(len(clip.tried)), "resend", uri)
        elif error == "storage":
            actions += self._stop(StorageUnavailable(message))
            self._clip_failed(uri, message, actions)
        else:
            self._clip_failed(uri, message, actions)
        return actions + self._admit(now)

    def on_writer_result(self, key: tuple[str, int], error: str | None, message: str, now: float) -> list:
        """A writer ended: ``error`` None (written), ``lost`` (its process kept dying), ``storage``,
        ``lease`` or ``fatal``."""
        self.events += 1
        task_id = self.writing.pop(key, None)
        if task_id is None:
            return []
        run = self.tasks[task_id]
        actions: list = []
        if error is None:
            self._move(run, DONE)
            self.done.append(task_id)
            self.scenes_written += len(run.task.steps)
            self.done_clips -= run.clips  # written: nothing asks for these clips again
        elif error == "lost":
            self._retry_or_fail(run, f"writer failed ({message})", actions)
        elif error == "storage":
            actions += self._stop(StorageUnavailable(message))
            self._fail(run, message, actions)
        elif error == "lease":
            actions += self._stop(LeaseLost(message))
            self._fail(run, message, actions)
        else:
            self._fail(run, message, actions)
        return actions + self._admit(now)

    def on_captions(self, batch: int, captions: list[str] | None, error: str | None, message: str,
                    now: float) -> list:
        self.events += 1
        sent = self.captioning.pop(batch, None)
        if sent is None:
            return []
        actor, items = sent
        self.load[actor] = max(0, self.load.get(actor, 1) - 1)
        actions: list = []
        for (task_id, step), caption in zip(items, captions or [None] * len(items)):
            run = self.tasks.get(task_id)
            if run is None or run.state != CAPTIONING:
                continue
            if caption is None:
                run.caption_failures += 1
                if error in ("retry", "restarting") and run.caption_failures < self.policy.call_attempts:
                    # Like a clip: sent again after a backoff, to another actor than the one that just failed.
                    self.caption_avoid[(task_id, step)] = actor
                    self._timer(now + retry_backoff(run.caption_failures), "caption", (task_id, step))
                    continue
                if error == "storage":
                    actions += self._stop(StorageUnavailable(message))
                self._fail(run, f"captioning failed: {message}", actions)
                continue
            run.captions.append(caption)
            if len(run.captions) < len(run.task.steps):
                self.caption_waiting.append((task_id, len(run.captions)))
            else:
                self._move(run, READY)
                self.queue.append(task_id)
        return actions + self._admit(now)

    def on_tick(self, now: float) -> list:
        actions: list = []
        while self.timers and self.timers[0][0] <= now:
            _, _, kind, key = heapq.heappop(self.timers)
            if kind == "deadline":
                (task_key, state), run = key, self.tasks.get(key[0][0])
                if run is not None and run.key == task_key and run.state == state:  # still in the work the deadline measures
                    self._deadline(run, actions)
            elif kind == "clip-timeout":
                call, uri = key
                if self.calls.get(call) == uri:
                    actions.append(CancelClip(call))
                    actions += self.on_clip_result(call, None, "retry", "did not answer in time", now)
            elif kind == "resend":  # its backoff is over
                if key in self.clips and self.clips[key].actor is None and key not in self.done_clips:
                    self.held.append(key)
            elif kind == "caption":
                run = self.tasks.get(key[0])
                if run is not None and run.state == CAPTIONING:
                    self.caption_waiting.appendleft(key)
        return actions + self._admit(now)

    # -- internals ---------------------------------------------------------------------------------------
    def _need_clip(self, run: TaskRun, request: ClipRequest, now: float) -> list:
        uri = request.clip
        run.clips.add(uri)
        if uri in self.done_clips:
            return []
        run.pending.add(uri)
        clip = self.clips.get(uri)
        if clip is not None:  # an earlier attempt of this task already asked for it: join that call
            clip.waiting.add(run.task.id)
            return []
        self.clips[uri] = ClipCall(request, {run.task.id})
        self.held.append(uri)
        return self._send(now)

    def _send(self, now: float) -> list:
        """Send held clips, oldest first, while a video actor has room (`Slots`: late binding)."""
        actions: list = []
        while self.held and self.slots.open:
            uri = self.held[0]
            clip = self.clips.get(uri)
            if clip is None or clip.actor is not None or uri in self.done_clips:
                self.held.popleft()
                continue
            actor = self.slots.take(avoid_after_failure(clip.tried, len(self.members["video"])))
            if actor is None:
                break  # only actors this clip just failed on have room: it waits for another
            self.held.popleft()
            queued = self.slots.load[actor] - 1
            clip.actor = actor
            clip.call = next(self.ids)
            self.calls[clip.call] = uri
            timeout = self.policy.clip_timeout(queued)
            self._timer(now + timeout, "clip-timeout", (clip.call, uri))
            actions.append(SendClip(clip.call, actor, clip.request, timeout))
        return actions

    def _clip_done(self, uri: str, actions: list) -> None:
        clip = self.clips.pop(uri)
        self.done_clips.add(uri)
        for task_id in clip.waiting:
            run = self.tasks.get(task_id)
            if run is not None:
                run.pending.discard(uri)
                self._maybe_ready_to_write(run)

    def _clip_failed(self, uri: str, reason: str, actions: list) -> None:
        clip = self.clips.pop(uri)
        for task_id in list(clip.waiting):
            run = self.tasks.get(task_id)
            if run is not None and uri in run.pending:
                self._fail(run, reason, actions)

    def _maybe_ready_to_write(self, run: TaskRun) -> None:
        if run.state == RENDERING and run.sequenced and not run.pending:
            self._move(run, WRITE_READY)
            self.write_ready.append(run.task.id)

    def _deadline(self, run: TaskRun, actions: list) -> None:
        limit = self.policy.sequence_deadline_s if run.state == SEQUENCING else self.policy.write_deadline_s
        if run.state == SEQUENCING and run.driver is not None:
            actions.append(ReplaceDriver(run.driver))
            self.idle.append(run.driver)
            run.driver = None
        elif run.state == WRITING:
            self.writing.pop(run.key, None)
            actions.append(CancelWriter(run.key))
        self._retry_or_fail(run, f"deadline of {limit:g} s passed while {run.state.replace('_', ' ')}", actions)

    def _retry_or_fail(self, run: TaskRun, reason: str, actions: list) -> None:
        if run.state == WRITE_READY:
            self._remove_write_ready(run.task.id)
        if run.attempt < self.policy.task_retries and self.stopped is None:
            run.attempt += 1
            run.sequenced, run.scenes, run.driver = False, 0, None
            self._drop_pending(run)
            self._move(run, QUEUED)
            self.queue.appendleft(run.task.id)  # next: its clips may be rendering, it should not wait for the end
            actions.append(Retrying(run.task.id, reason, run.attempt + 1))
        else:
            self._fail(run, f"{reason} ({run.attempt + 1} attempts)", actions)

    def _drop_pending(self, run: TaskRun) -> None:
        """This attempt waits for nothing more (a clip call it started goes on, and a later attempt joins it)."""
        run.pending.clear()

    def _cancel_orphans(self, run: TaskRun) -> list:
        """The failed task's clip calls (of any of its attempts) that no other task waits for: cancelled."""
        actions = []
        for uri in run.clips:
            clip = self.clips.get(uri)
            if clip is None:
                continue
            clip.waiting.discard(run.task.id)
            if not clip.waiting:
                del self.clips[uri]
                if self.calls.pop(clip.call, None) is not None:
                    self._unload(clip)
                    actions.append(CancelClip(clip.call))
        return actions

    def _unload(self, clip: ClipCall) -> None:
        if clip.actor is not None:
            self.slots.give(clip.actor)

    def _remove_write_ready(self, task_id: str) -> None:
        try:
            self.write_ready.remove(task_id)  # rare (a deadline while waiting for a writer slot)
        except ValueError:
            pass

    def _fail(self, run: TaskRun, reason: str, actions: list) -> None:
        if run.state in (DONE, FAILED):
            return
        if run.state == WRITE_READY:
            self._remove_write_ready(run.task.id)
        if run.state == SEQUENCING and run.driver is not None:
            actions.append(ReplaceDriver(run.driver))  # stop its work: the task will not be written
            self.idle.append(run.driver)
            run.driver = None
        self._drop_pending(run)
        actions += self._cancel_orphans(run)
        self._move(run, FAILED)
        self.failed.append((run.task.id, reason))
        actions.append(RecordFailure(run.task.id, reason))

    def _stop(self, reason: BaseException) -> list:
        if self.stopped is not None:
            return []
        self.stopped = reason
        for task_id in list(self.queue) + list(self.to_caption):
            run = self.tasks.get(task_id)
            if run is not None and run.state in (QUEUED, READY, CAPTIONING):
                self._move(run, FAILED)
                self.failed.append((task_id, "not started: the run stopped"))
        self.queue.clear()
        self.to_caption.clear()
        return [Stop(reason)]

    def _admit(self, now: float) -> list:
        """Start what the bounds allow: resent clips, captions, tasks on idle drivers, writers (nothing once
        the run stopped)."""
        if self.stopped is not None:
            return []
        actions: list = []
        actions += self._send(now)
        actions += self._admit_captions()
        pressure = self.pressure_since is not None
        while self.queue and self.admission.may_sequence(len(self.idle), self.past_sequencing, pressure):
            run = self.tasks.get(self.queue.popleft())
            if run is None or run.state not in (QUEUED, READY) or run.captions is None or len(run.captions) < len(run.task.steps):
                continue
            driver = self.idle.pop()
            run.driver = driver
            run.started = now
            self._move(run, SEQUENCING)
            self._timer(now + self.policy.sequence_deadline_s, "deadline", (run.key, SEQUENCING))
            actions.append(StartTask(driver, run.key, run.task, list(run.captions), run.fingerprint))
        while self.write_ready and self.admission.may_write(len(self.writing), pressure):
            run = self.tasks.get(self.write_ready.popleft())
            if run is None or run.state != WRITE_READY:
                continue
            self._move(run, WRITING)
            self.writing[run.key] = run.task.id
            self._timer(now + self.policy.write_deadline_s, "deadline", (run.key, WRITING))
            actions.append(StartWriter(run.key, run.task, run.fingerprint, run.started))
        return actions

    def _admit_captions(self) -> list:
        actions: list = []
        while self.to_caption and self.admission.may_caption(self.counts[CAPTIONING] + self.counts[READY],
                                                             self.pressure_since is not None):
            run = self.tasks[self.to_caption.popleft()]
            run.captions = []
            self._move(run, CAPTIONING)
            self.caption_waiting.append((run.task.id, 0))
        members = self.members["caption"]
        while self.caption_waiting and members:
            items = [self.caption_waiting.popleft()
                     for _ in range(min(self.policy.caption_batch, len(self.caption_waiting)))]
            avoid = {self.caption_avoid.pop(item) for item in items if item in self.caption_avoid}
            pairs = []
            for task_id, step in items:
                run = self.tasks[task_id]
                pairs.append((window_context(run.task.steps, run.captions, step), run.task.steps[step]))
            actor = choose_actor(sample_candidates(members, lambda name: name in avoid, self.rng), self.load)
            self.load[actor] = self.load.get(actor, 0) + 1
            batch = next(self.ids)
            self.captioning[batch] = (actor, items)
            actions.append(SendCaptions(batch, actor, tuple(pairs)))
        return actions

