"""Run a batch of tasks on a Ray cluster: drivers, writers, retries, deadlines, progress, summary.

A task goes: queue -> a driver (sequencing; the slot is held only while it
chooses scenes) -> rendering (its clips are made; only the job watches them, no
process is held) -> a writer task (writes, manifest last) -> done. A task is
retried from the start only when its driver or writer process died or its
deadline passed; a failed model call is retried on another actor inside the
driver/writer (`dispatch.Dispatcher`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray

from cosed.config import RunConfig
from cosed.distributed import telemetry
from cosed.distributed.actors import RayBackend, TaskDriver, warm_writer_process, write_task
from cosed.distributed.dispatch import CallFailed, CallPolicy, Dispatcher
from cosed.distributed.pools import Pools, pool_totals
from cosed.distributed.costs import CostModel, TaskWork, batch_work, flow_order
from cosed.models.profiles import ModelUnavailable, Profile
from cosed.rewrite import Rewriter, make_rewriter
from cosed.runner import RunSummary, failure, finish_run, prepare_run, profile_cache, record_failure
from cosed.tasks import Task, TaskError

log = logging.getLogger("cosed")
PROGRESS_SECONDS = 1.0


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start a local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def start_pools(cfg: RunConfig, costs: CostModel | None = None, expected: TaskWork | None = None) -> Pools:
    pools = Pools(cfg, costs, expected)
    try:
        pools.start()
    except (ray.exceptions.RayError, TimeoutError) as exc:
        pools.shutdown()
        cause = exc
        while getattr(cause, "cause", None) is not None and cause.cause is not cause:
            cause = cause.cause
        raise ModelUnavailable(f"model actors could not start: {cause}") from exc
    return pools


@contextmanager
def pooled_backend(cfg: RunConfig, address: str | None = None):
    """A `RayBackend` over fresh model pools, for verbs that only need model calls (training)."""
    connect(address)
    pools = start_pools(cfg)
    try:
        yield RayBackend(Dispatcher(pools.membership(), CallPolicy.from_config(cfg.ray), pools.directory))
    finally:
        pools.shutdown()


def busy_fractions(stats: list[dict]) -> dict[str, float]:
    """Per pool: busy seconds over alive seconds, summed over its actors."""
    return {kind: round(busy / alive, 3) if alive else 0.0
            for kind, (busy, alive) in pool_totals(stats, "busy", "alive").items()}


@dataclass
class Job:
    """What every driver of one run shares."""

    out: str
    profile: Profile
    cfg: RunConfig
    pools: Pools
    rewriter: Rewriter
    summary: RunSummary
    progress: bool
    total_scenes: int = 0
    writes: list[dict] = field(default_factory=list)


@dataclass
class Attempt:
    task: Task
    number: int
    started: float  # monotonic
    started_wall: float
    driver: object = None


@dataclass(eq=False)
class Rendering:
    """A sequenced task whose clips are still being made; its writer starts when they are done.

    A writer started earlier would hold a worker process (and its memory) while it
    waits: with many tasks in flight, those idle processes were most of a node's RAM.
    Past ``overdue`` the writer starts anyway and its dispatcher retries what is late.
    """

    attempt: Attempt
    payload: object
    pending: list
    overdue: float  # monotonic


def run_on_ray(tasks_uri: str, out: str, cfg: RunConfig, *, overwrite: bool = False, progress: bool = True,
               address: str | None = None) -> RunSummary:
    start = time.perf_counter()
    profile, cfg, summary, todo = prepare_run(tasks_uri, out, cfg, overwrite)
    try:
        if todo:
            connect(address)
            costs = CostModel.from_dict(profile.costs, cfg.ray.costs)
            pools = start_pools(cfg, costs, batch_work((len(t.steps) for t in todo), cfg, costs))
            try:
                plan = pools.cluster_plan
                rewriter = make_rewriter(cfg.rewriter, model=cfg.rewriter_model, cache_dir=profile_cache(cfg))
                job = Job(out, profile, cfg, pools, rewriter, summary, progress,
                          total_scenes=sum(len(t.steps) for t in todo))
                if progress:
                    print(f"[cosed] {plan.describe()}", flush=True)
                drive(job, todo, plan.drivers)
                summary.actors = pools.stats()
                busy = busy_fractions(summary.actors)
                summary.extra = {"plan": plan.to_dict(), "pools": pools.describe(), "busy_fraction": busy,
                                 "bottleneck": max(busy, key=busy.get) if busy else None,
                                 "moves": pools.moves, "hung_calls_restarted": pools.hung_kills,
                                 "writer_peak_bytes": max((w["peak_bytes"] for w in job.writes), default=0)}
            finally:
                pools.shutdown()
    finally:
        summary.seconds = time.perf_counter() - start
        finish_run(out, summary)
    return summary


AFTER_SEQUENCING = 2  # tasks past their driver (clips rendering, writing) may number this many times the drivers


def drive(job: Job, todo: list[Task], limit: int) -> None:
    """Keep at most ``limit`` tasks sequencing and ``AFTER_SEQUENCING * limit`` waiting for their clips or
    writing (a bound on what a run holds; room to spare, so that a burst of clips does not stop the
    drivers); retry, time out, report."""
    cfg = job.cfg
    order = flow_order(todo, cfg, job.pools.costs, job.pools.cluster_plan.capacity())
    queue = deque(Attempt(task, 0, 0.0, 0.0) for task in order)
    idle = start_drivers(min(limit, len(todo)), job.cfg.ray.start_timeout_s)
    job.pools.begin()
    sequencing: dict = {}  # status ref -> (Attempt, payload ref)
    rendering: list[Rendering] = []
    writing: dict = {}  # write ref -> Attempt
    last_tick = last_progress = time.monotonic()
    shown = -1
    try:
        while queue or sequencing or rendering or writing:
            while queue and idle and len(rendering) + len(writing) < AFTER_SEQUENCING * limit:
                attempt = queue.popleft()
                attempt.driver, attempt.started, attempt.started_wall = idle.pop(), time.monotonic(), time.time()
                status, payload = attempt.driver.run.options(num_returns=2).remote(
                    attempt.task, job.rewriter.captions(attempt.task), cfg, job.pools.membership(),
                    job.pools.directory, policy(job))
                sequencing[status] = (attempt, payload)
            telemetry.record("cosed_tasks", len(queue), state="queued")
            clips = [ref for item in rendering for ref in item.pending]
            ready, _ = ray.wait(list(sequencing) + list(writing) + clips, num_returns=1, timeout=PROGRESS_SECONDS,
                                fetch_local=False)
            for ref in ready:
                if ref in sequencing:
                    attempt, payload = sequencing.pop(ref)
                    settle_sequencing(job, ref, payload, attempt, queue, idle, rendering)
                elif ref in writing:
                    settle_writing(job, ref, writing.pop(ref), queue)
            start_writers(job, rendering, writing)
            enforce_deadlines(job, queue, idle, sequencing, rendering, writing)
            now = time.monotonic()
            if now - last_tick >= cfg.ray.rescale_seconds:
                job.pools.tick()
                last_tick = now
            if job.progress and now - last_progress >= PROGRESS_SECONDS:
                shown = report(job, sequencing, rendering, writing, shown)
                last_progress = now
        if job.progress:
            report(job, sequencing, rendering, writing, shown)
    finally:
        for driver in idle + [attempt.driver for attempt, _ in sequencing.values()]:
            ray.kill(driver)
        for ref in writing:
            ray.cancel(ref, force=True)


WARM_WRITERS = 4  # writers mostly wait briefly for their last clip: a few processes cover the usual overlap


def start_drivers(count: int, timeout_s: float) -> list:
    """``count`` drivers and a few warm writer processes, up before the first task starts: a process
    start (imports, codecs) takes seconds, which no task should wait for in the middle of the run."""
    drivers = [TaskDriver.remote() for _ in range(count)]
    warm = [warm_writer_process.remote() for _ in range(min(count, WARM_WRITERS))]
    ready = [driver.progress.remote() for driver in drivers] + warm
    ray.wait(ready, num_returns=len(ready), timeout=timeout_s)
    return drivers


def policy(job: Job) -> CallPolicy:
    return CallPolicy.from_config(job.cfg.ray, job.pools.expected())


def retry_or_fail(job: Job, attempt: Attempt, queue: deque, reason: str) -> None:
    if attempt.number < job.cfg.ray.task_retries:
        log.warning("task %s: %s; retrying (attempt %d)", attempt.task.id, reason, attempt.number + 2)
        queue.append(Attempt(attempt.task, attempt.number + 1, 0.0, 0.0))
    else:
        fail(job, attempt.task, f"{reason} ({attempt.number + 1} attempts)")


def fail(job: Job, task: Task, reason: str) -> None:
    record_failure(job.out, job.summary, TaskError(source="generation", task_id=task.id, reason=reason))


def settle_sequencing(job: Job, ref, payload, attempt: Attempt, queue: deque, idle: list,
                      rendering: list[Rendering]) -> None:
    """A driver finished choosing scenes: free its slot; the task waits for its clips."""
    try:
        status = ray.get(ref)
    except ray.exceptions.RayError as exc:
        _consume(payload)  # the same error; read so Ray does not log it as unhandled
        settle_failed_driver(job, exc, attempt, queue, idle)
        return
    idle.append(attempt.driver)
    calls = policy(job)
    overdue = time.monotonic() + calls.timeout(calls.expected.get("video", 1.0), len(status["clips"]))
    rendering.append(Rendering(attempt, payload, list(status["clips"]), overdue))


def start_writers(job: Job, rendering: list[Rendering], writing: dict) -> None:
    """A writer task for each task whose clips are all made (or failed, or overdue)."""
    now = time.monotonic()
    pending = [ref for item in rendering for ref in item.pending]
    if pending:  # one wait for every task's clips, not one per task on each pass of the loop
        done = set(ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)[0])
        for item in rendering:
            item.pending = [ref for ref in item.pending if ref not in done]
    for item in list(rendering):
        if item.pending and now < item.overdue:
            continue
        rendering.remove(item)
        write = write_task.options(max_retries=job.cfg.ray.task_retries + 1, retry_exceptions=False).remote(
            job.out, item.payload, job.profile, job.cfg, job.pools.membership(), job.pools.directory, policy(job),
            item.attempt.started_wall)
        writing[write] = item.attempt


def _consume(ref) -> None:
    try:
        ray.get(ref, timeout=1)
    except Exception:
        pass


def settle_failed_driver(job: Job, exc: Exception, attempt: Attempt, queue: deque, idle: list) -> None:
    """Only the driver's own death is "driver died": failed model calls arrive as `CallFailed` from inside it."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        idle.append(attempt.driver)
        cause = exc.cause or exc
        if isinstance(cause, CallFailed):
            fail(job, attempt.task, f"model calls kept failing: {cause}")
        else:
            record_failure(job.out, job.summary, failure(attempt.task, cause))
        return
    idle.append(TaskDriver.remote())
    what = "driver died" if isinstance(exc, ray.exceptions.RayActorError) else "driver lost"  # e.g. its node left
    retry_or_fail(job, attempt, queue, f"{what} ({type(exc).__name__})")


def settle_writing(job: Job, ref, attempt: Attempt, queue: deque) -> None:
    summary = job.summary
    try:
        written = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause or exc
        if isinstance(cause, CallFailed):
            fail(job, attempt.task, f"video calls kept failing: {cause}")
        else:
            record_failure(job.out, summary, failure(attempt.task, cause))
        return
    except ray.exceptions.RayError as exc:  # the writer's process or node, after Ray's own retries
        retry_or_fail(job, attempt, queue, f"writer failed ({type(exc).__name__})")
        return
    job.writes.append(written)
    summary.done.append(attempt.task.id)
    summary.scenes += len(attempt.task.steps)
    telemetry.record("cosed_task_latency_s", time.monotonic() - attempt.started)


def enforce_deadlines(job: Job, queue: deque, idle: list, sequencing: dict, rendering: list[Rendering],
                      writing: dict) -> None:
    """A task attempt older than ``task_deadline_s`` is stopped and retried (or failed)."""
    limit = job.cfg.ray.task_deadline_s
    now = time.monotonic()
    for ref, (attempt, _) in list(sequencing.items()):
        if now - attempt.started > limit:
            del sequencing[ref]
            ray.kill(attempt.driver)
            idle.append(TaskDriver.remote())
            retry_or_fail(job, attempt, queue, f"deadline of {limit:g} s passed while sequencing")
    for item in list(rendering):
        if now - item.attempt.started > limit:
            rendering.remove(item)
            retry_or_fail(job, item.attempt, queue, f"deadline of {limit:g} s passed while rendering clips")
    for ref, attempt in list(writing.items()):
        if now - attempt.started > limit:
            del writing[ref]
            ray.cancel(ref, force=True)
            retry_or_fail(job, attempt, queue, f"deadline of {limit:g} s passed while writing")


def report(job: Job, sequencing: dict, rendering: list[Rendering], writing: dict, shown: int) -> int:
    """``[cosed] N/M scenes`` whenever a scene is chosen or a task finishes."""
    running = [attempt.driver for attempt, _ in sequencing.values()]
    after = [item.attempt for item in rendering] + list(writing.values())
    chosen = sum(len(attempt.task.steps) for attempt in after) + job.summary.scenes
    if running:
        refs = [driver.progress.remote() for driver in running]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
        for ref in ready:
            try:
                chosen += ray.get(ref)
            except ray.exceptions.RayError:
                pass
    summary = job.summary
    key = chosen * 100003 + len(summary.done) * 101 + len(summary.failed)
    if key != shown:
        print(f"[cosed] {chosen}/{job.total_scenes} scenes chosen, {summary.scenes} written; "
              f"tasks: {len(summary.done)} done, {len(summary.failed)} failed, {len(after)} rendering or writing",
              flush=True)
    return key
