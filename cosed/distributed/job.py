"""Run a batch of tasks on a Ray cluster: bounded concurrent drivers, retries, resume, summary."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from cosed import storage
from cosed.config import RunConfig
from cosed.distributed.actors import ModelPools, Stitcher, TaskDriver
from cosed.distributed.costs import CostModel, TaskWork, batch_work
from cosed.models.profiles import ModelUnavailable, Profile
from cosed.rewrite import Rewriter, make_rewriter
from cosed.runner import RunSummary, failure, prepare_run, profile_cache, write_errors
from cosed.tasks import Task, TaskError

log = logging.getLogger("cosed")
SUMMARY = "summary.json"


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``, or start a local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)


def start_pools(cfg: RunConfig, costs: CostModel | None = None, expected: TaskWork | None = None):
    pools = ModelPools.remote(cfg)
    hint = expected.critical_path / expected.total if expected and expected.total else None
    try:
        layout = ray.get(pools.start.remote(costs, expected.seconds if expected else None, hint))
    except ray.exceptions.RayError as exc:
        ray.kill(pools)
        cause = exc
        while getattr(cause, "cause", None) is not None and cause.cause is not cause:
            cause = cause.cause
        raise ModelUnavailable(f"model actors could not start: {cause}") from exc
    return pools, layout


@contextmanager
def pooled_backend(cfg: RunConfig, address: str | None = None):
    """A `RayBackend` over fresh model pools, for verbs that only need model calls (training)."""
    from cosed.distributed.actors import RayBackend

    connect(address)
    pools, _ = start_pools(cfg)
    try:
        yield RayBackend(pools)
    finally:
        ray.kill(pools)


def busy_fractions(stats: list[dict]) -> dict[str, float]:
    """Per pool: busy seconds over alive seconds, summed over its actors."""
    busy: dict[str, float] = {}
    alive: dict[str, float] = {}
    for item in stats:
        busy[item["kind"]] = busy.get(item["kind"], 0.0) + item["busy"]
        alive[item["kind"]] = alive.get(item["kind"], 0.0) + item["alive"]
    return {kind: round(busy[kind] / alive[kind], 3) if alive[kind] else 0.0 for kind in busy}


@dataclass
class Job:
    """What every driver of one run shares."""

    out: str
    profile: Profile
    cfg: RunConfig
    pools: ray.actor.ActorHandle
    stitcher: ray.actor.ActorHandle
    rewriter: Rewriter
    summary: RunSummary
    progress: bool


def run_on_ray(tasks_uri: str, out: str, cfg: RunConfig, *, overwrite: bool = False, progress: bool = True,
               address: str | None = None) -> RunSummary:
    start = time.perf_counter()
    profile, cfg, summary, todo = prepare_run(tasks_uri, out, cfg, overwrite)
    if todo:
        connect(address)
        costs = CostModel.from_dict(profile.costs, cfg.ray.costs)
        pools, _ = start_pools(cfg, costs, batch_work((len(t.steps) for t in todo), cfg, costs))
        plan = ray.get(pools.get_plan.remote())
        if progress:
            print(f"[cosed] {plan.describe()}", flush=True)
        stitcher = Stitcher.remote()
        try:
            rewriter = make_rewriter(cfg.rewriter, model=cfg.rewriter_model, cache_dir=profile_cache(cfg))
            drive(Job(out, profile, cfg, pools, stitcher, rewriter, summary, progress), todo, plan.drivers)
            summary.actors = ray.get(pools.stats.remote())
            summary.extra = {"plan": plan.to_dict(), "pools": ray.get(pools.describe.remote()),
                             "busy_fraction": busy_fractions(summary.actors)}
        finally:
            # Model actors are owned by the pool registry and go with it.
            ray.kill(pools)
            ray.kill(stitcher)
    summary.seconds = time.perf_counter() - start
    storage.write_text(storage.join(out, SUMMARY), json.dumps(
        {**summary.to_dict(), "done_ids": summary.done, "skipped_ids": summary.skipped,
         "actors": summary.actors}, indent=2) + "\n")
    return summary


def drive(job: Job, todo: list[Task], limit: int) -> None:
    """Keep at most ``limit`` drivers busy; retry a task whose driver died; record failures."""
    queue = deque((task, 0) for task in todo)
    idle = [TaskDriver.remote() for _ in range(min(limit, len(todo)))]
    running: dict = {}
    last_rescale = time.monotonic()
    try:
        while queue or running:
            while queue and idle:
                task, attempt = queue.popleft()
                driver = idle.pop()
                ref = driver.run.remote(task, job.rewriter.captions(task), attempt, job.out, job.profile, job.cfg,
                                        job.pools, job.stitcher)
                running[ref] = (driver, task, attempt)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=job.cfg.ray.rescale_seconds)
            if time.monotonic() - last_rescale >= job.cfg.ray.rescale_seconds:
                job.pools.rescale.remote()
                last_rescale = time.monotonic()
            for ref in ready:
                driver, task, attempt = running.pop(ref)
                if settle(job, ref, task, attempt, queue):
                    idle.append(driver)
                else:
                    idle.append(TaskDriver.remote())
                if job.progress:
                    report(job, task, len(todo))
    finally:
        for driver in idle + [entry[0] for entry in running.values()]:
            ray.kill(driver)


def settle(job: Job, ref, task: Task, attempt: int, queue: deque) -> bool:
    """Record one finished driver call; False when the driver itself died."""
    summary = job.summary
    try:
        ray.get(ref)
    except ray.exceptions.ActorDiedError as exc:
        if attempt < job.cfg.ray.task_retries:
            log.warning("driver of task %s died (%s); retrying", task.id, type(exc).__name__)
            queue.append((task, attempt + 1))
        else:
            summary.failed.append(TaskError(source="generation", task_id=task.id,
                                            reason=f"driver died {attempt + 1} times: {exc}"))
            write_errors(job.out, summary.rejected + summary.failed)
        return False
    except ray.exceptions.RayTaskError as exc:
        summary.failed.append(failure(task, exc.cause or exc))
        write_errors(job.out, summary.rejected + summary.failed)
    else:
        summary.done.append(task.id)
        summary.scenes += len(task.steps)
    return True


def report(job: Job, task: Task, total: int) -> None:
    summary = job.summary
    state = "done" if task.id in summary.done else "failed" if any(e.task_id == task.id for e in summary.failed) \
        else "retrying"
    finished = len(summary.done) + len(summary.failed)
    print(f"[cosed] {finished}/{total} tasks, {summary.scenes} scenes: {task.id} {state}", flush=True)
