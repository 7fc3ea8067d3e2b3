"""A batch of tasks in this process: read, validate, resume, generate, report.

The Ray job runner (`cosed.distributed.job`) shares everything here but the
loop itself.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cosed import storage
from cosed.backend import LocalBackend, make_backend
from cosed.config import RunConfig
from cosed.donemarks import resume_scan
from cosed.engine import generate_task, task_fingerprint, task_uri  # noqa: F401  (task_uri: its callers import it here)
from cosed.errors import UserError
from cosed.feed import TaskFeed, input_errors
from cosed.lease import LeaseLost, OutputLease
from cosed.memory import gpu_memory_gib
from cosed.models.loaders import resolve_device
from cosed.runplan import RANDOM_WEIGHTS, RunPlan, plan_run, resolve_run  # noqa: F401  (resolve_run: its callers import it here)
from cosed.rewrite import make_rewriter
from cosed.shards import TaskStream
from cosed.storage import StorageUnavailable
from cosed.tasks import CAPTIONS, ERRORS, ERRORS_DIR, SUMMARY, Task, TaskError, TaskSet, task_folder_name

log = logging.getLogger("cosed")


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunSummary:
    out: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[TaskError] = field(default_factory=list)
    rejected: list[TaskError] = field(default_factory=list)
    scenes: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    actors: list[dict] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)
    fingerprints: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False  # the profile's models are random-weight twins: said first, last and in the record

    @property
    def scenes_per_minute(self) -> float:
        return 60.0 * self.scenes / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"out": self.out, "done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "rejected": len(self.rejected), "scenes": self.scenes, "seconds": round(self.seconds, 2),
                "scenes_per_minute": round(self.scenes_per_minute, 2), "redone_stale": len(self.stale),
                "run_id": self.run_id, "random_weights": self.random_weights, **self.extra}

    def to_record(self) -> dict:
        """What summary.json holds."""
        return {**self.to_dict(), "done_ids": self.done, "skipped_ids": self.skipped, "stale_ids": self.stale,
                "actors": self.actors, "fingerprints": self.fingerprints}

    def lines(self) -> list[str]:
        lines = [f"tasks: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
                 f"{len(self.failed)} failed, {len(self.rejected)} rejected"
                 + (f" ({len(self.stale)} redone: inputs or config changed since their manifest)"
                    if self.stale else ""),
                 f"scenes: {self.scenes} in {self.seconds:.1f} s ({self.scenes_per_minute:.1f} scenes/min)"]
        lines += [f"  {k}: {v}" for k, v in self.extra.items()]
        if self.failed or self.rejected:
            lines.append(f"errors: {storage.join(self.out, ERRORS)}")
            lines += [f"  {e}" for e in (self.rejected + self.failed)[:10]]
        lines.append(f"outputs: {self.out}/<task>/video.mp4, storyboard.png, manifest.json, scenes/")
        if self.random_weights:
            lines.append(RANDOM_WEIGHTS)
        return lines


def read_tasks(tasks_uri: str, cfg: RunConfig) -> TaskSet:
    """Every task of a file or a prefix of shards (`cosed.shards`), with every rejected line."""
    with input_errors(tasks_uri):
        stream = TaskStream(tasks_uri, cfg.max_steps)
        task_set = TaskSet(tasks=list(stream), errors=stream.errors)
    if not task_set.tasks and not task_set.errors:
        raise UserError(f"the task file {tasks_uri} holds no tasks")
    return task_set


def write_errors(out: str, errors: list[TaskError]) -> None:
    """errors.jsonl, whole: one line per rejected or failed task of this run. Best-effort: never raises."""
    uri = storage.join(out, ERRORS)
    try:
        if errors or storage.exists(uri):
            storage.write_text(uri, "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in errors))
    except Exception as exc:  # recording must never abort a run
        log.warning("could not write %s: %s", uri, exc)


def record_failure(out: str, summary: RunSummary, error: TaskError) -> None:
    """Add one failure to the summary and write it as its own object (`write_failure`)."""
    summary.failed.append(error)
    write_failure(out, summary.run_id, error)


def write_failure(out: str, run_id: str, error: TaskError) -> None:
    """One failure as its own object, errors/<run>/<task>.json.

    Append-only (one object per failure, nothing rewritten) and best-effort: a
    storage error here is logged, never raised, so it cannot abort the run.
    """
    name = task_folder_name(error.task_id) if error.task_id else f"line-{error.line}"
    uri = storage.join(out, ERRORS_DIR, run_id, f"{name}.json")
    try:
        storage.write_text(uri, json.dumps(error.to_dict(), ensure_ascii=False) + "\n")
    except Exception as exc:
        log.warning("could not record the failure of task %s at %s: %s", error.task_id, uri, exc)


def finish_run(out: str, summary: RunSummary) -> None:
    """errors.jsonl then summary.json, each best-effort: a run always tries to leave both. A summary the output
    cannot take (its storage is gone) is kept in the local log folder instead, and the warning says where."""
    write_errors(out, summary.rejected + summary.failed)
    uri = storage.join(out, SUMMARY)
    text = json.dumps(summary.to_record(), indent=2, ensure_ascii=False) + "\n"
    try:
        storage.write_text(uri, text)
    except Exception as exc:
        kept = keep_locally(f"summary-{summary.run_id}.json", text)
        log.warning("could not write %s (%s); the summary is kept at %s", uri, exc, kept)


def keep_locally(name: str, text: str) -> str:
    """Write a file to cosed's local log folder (or the temp folder); returns its path."""
    import tempfile

    from cosed.models.profiles import default_cache_dir

    for folder in (default_cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return str(folder / name)
        except OSError:
            continue
    return "(nowhere: no writable folder)"


def pending_tasks(tasks: list[Task], out: str, overwrite: bool,
                  fingerprints: dict[str, str]) -> tuple[list[Task], list[Task], list[Task]]:
    """(to run, already done, stale): a task is done when its done marker and manifest say so for its
    fingerprint, found by listing (`cosed.donemarks`).

    A manifest from other inputs, config, models or selector is stale: reported and redone into place.
    """
    todo, done, stale = resume_scan(tasks, out, overwrite, fingerprints)
    for task in stale:
        log.warning("task %s: its manifest is from other inputs or config; redoing it (its files stay until "
                    "the new ones are complete)", task.id)
    return todo, done, stale


def failure(task: Task, exc: BaseException) -> TaskError:
    log.error("task %s failed:\n%s", task.id, "".join(traceback.format_exception(exc)))
    return TaskError(source="generation", task_id=task.id, reason=f"{type(exc).__name__}: {exc}")


def prepare_run(tasks_uri: str, out: str, plan: RunPlan, overwrite: bool) -> tuple[RunSummary, TaskFeed]:
    """The run's summary and its pending tasks as a feed (`cosed.feed`): the input is read as the run
    pulls tasks, a shard at a time, and classified against one listing of the output."""
    cfg = plan.cfg
    storage.configure(cfg.storage.retry_seconds, cfg.storage.throttle_seconds)
    summary = RunSummary(out=out)
    summary.extra["run_plan"] = plan.describe()
    summary.random_weights = plan.profile.random_weights
    feed = TaskFeed.open(tasks_uri, out, cfg.max_steps, overwrite, summary,
                         lambda task: task_fingerprint(task, plan.profile, cfg))
    return summary, feed


def run_in_process(tasks_uri: str, out: str, cfg: RunConfig, *, overwrite: bool = False,
                   progress: bool = True, backend: LocalBackend | None = None,
                   lease: OutputLease | None = None, replan: bool = False) -> RunSummary:
    """Every task in this process, one after another. Pass ``backend`` to reuse loaded models.

    Stops (keeping what is finished) when the storage stays away past its retry
    budget or the output lease is lost: every later task would fail the same way.
    """
    start = time.perf_counter()
    plan = plan_run(cfg, out, lambda: gpu_memory_gib(resolve_device(cfg.device)), replan,
                    say=lambda line: print(line, flush=True))
    profile, cfg = plan.profile, plan.cfg
    summary, feed = prepare_run(tasks_uri, out, plan, overwrite)
    backend = backend or make_backend(profile, cfg)
    if feed.peek(1):
        backend.load_all()
    rewriter = make_rewriter(cfg.rewriter, model=cfg.rewriter_model, cache_dir=profile_cache(cfg),
                             device=backend.device, cache_root=storage.join(out, CAPTIONS))
    fence = lease.fence if lease else None
    try:
        with tqdm(total=feed.estimated_pending(), unit="task", disable=not progress, desc="cosed") as bar:
            for task, fingerprint in ((p.task, p.fingerprint) for p in feed):
                if lease:
                    lease.check()
                bar.set_postfix_str(task.id)
                try:
                    generate_task(task, rewriter.captions(task), backend, profile, cfg, out, fingerprint, fence=fence)
                except (StorageUnavailable, LeaseLost):
                    raise
                except Exception as exc:  # one broken task must not stop the batch
                    record_failure(out, summary, failure(task, exc))
                    continue
                summary.done.append(task.id)
                summary.scenes += len(task.steps)
                bar.update()
    finally:
        summary.seconds = time.perf_counter() - start
        finish_run(out, summary)
    return summary


def profile_cache(cfg: RunConfig) -> Path:
    from cosed.models.profiles import default_cache_dir

    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
