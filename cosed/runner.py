"""A batch of tasks in this process: read, validate, resume, generate, report.

The Ray job runner (`cosed.distributed.job`) shares everything here but the
loop itself.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cosed import storage
from cosed.backend import LocalBackend, make_backend
from cosed.config import RunConfig
from cosed.engine import MANIFEST, generate_task, task_uri
from cosed.models.profiles import Profile, resolve_profile
from cosed.rewrite import make_rewriter
from cosed.tasks import Task, TaskError, TaskSet, parse_tasks

log = logging.getLogger("cosed")
ERRORS = "errors.jsonl"


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

    @property
    def scenes_per_minute(self) -> float:
        return 60.0 * self.scenes / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"out": self.out, "done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed),
                "rejected": len(self.rejected), "scenes": self.scenes, "seconds": round(self.seconds, 2),
                "scenes_per_minute": round(self.scenes_per_minute, 2), **self.extra}

    def lines(self) -> list[str]:
        lines = [f"tasks: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
                 f"{len(self.failed)} failed, {len(self.rejected)} rejected",
                 f"scenes: {self.scenes} in {self.seconds:.1f} s ({self.scenes_per_minute:.1f} scenes/min)"]
        lines += [f"  {k}: {v}" for k, v in self.extra.items()]
        if self.failed or self.rejected:
            lines.append(f"errors: {storage.join(self.out, ERRORS)}")
            lines += [f"  {e}" for e in (self.rejected + self.failed)[:10]]
        lines.append(f"outputs: {self.out}/<task>/video.mp4, storyboard.png, manifest.json, scenes/")
        return lines


def resolve_run(cfg: RunConfig) -> tuple[Profile, RunConfig]:
    """The profile and the config with the profile's defaults filled in."""
    profile = resolve_profile(cfg.profile, cfg.cache_dir)
    return profile, cfg.with_defaults(profile.defaults)


def read_tasks(tasks_uri: str, cfg: RunConfig) -> TaskSet:
    try:
        data = storage.read_bytes(tasks_uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"task file not found: {tasks_uri}") from exc
    return parse_tasks(data, source=tasks_uri, max_steps=cfg.max_steps)


def write_errors(out: str, errors: list[TaskError]) -> None:
    """errors.jsonl, rewritten whole: one line per rejected or failed task."""
    uri = storage.join(out, ERRORS)
    if errors or storage.exists(uri):
        storage.write_text(uri, "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in errors))


def pending_tasks(tasks: list[Task], out: str, overwrite: bool) -> tuple[list[Task], list[Task]]:
    """(to run, already done): a task is done exactly when its manifest exists."""
    if overwrite:
        return list(tasks), []
    done = [t for t in tasks if storage.exists(task_uri(out, t, MANIFEST))]
    done_ids = {t.id for t in done}
    return [t for t in tasks if t.id not in done_ids], done


def failure(task: Task, exc: BaseException) -> TaskError:
    log.error("task %s failed:\n%s", task.id, "".join(traceback.format_exception(exc)))
    return TaskError(source="generation", task_id=task.id, reason=f"{type(exc).__name__}: {exc}")


def prepare_run(tasks_uri: str, out: str, cfg: RunConfig, overwrite: bool):
    """Resolve the profile, read and validate tasks, report rejects, and find what is left to do."""
    profile, cfg = resolve_run(cfg)
    task_set = read_tasks(tasks_uri, cfg)
    summary = RunSummary(out=out, rejected=list(task_set.errors))
    write_errors(out, summary.rejected)
    todo, done = pending_tasks(task_set.tasks, out, overwrite)
    summary.skipped = [t.id for t in done]
    return profile, cfg, summary, todo


def run_in_process(tasks_uri: str, out: str, cfg: RunConfig, *, overwrite: bool = False,
                   progress: bool = True, backend: LocalBackend | None = None) -> RunSummary:
    """Every task in this process, one after another. Pass ``backend`` to reuse loaded models."""
    start = time.perf_counter()
    profile, cfg, summary, todo = prepare_run(tasks_uri, out, cfg, overwrite)
    backend = backend or make_backend(profile, cfg)
    if todo:
        backend.load_all()
    rewriter = make_rewriter(cfg.rewriter, model=cfg.rewriter_model, cache_dir=profile_cache(cfg),
                             device=backend.device)
    with tqdm(total=sum(len(t.steps) for t in todo), unit="scene", disable=not progress, desc="cosed") as bar:
        for task in todo:
            bar.set_postfix_str(task.id)
            try:
                generate_task(task, rewriter.captions(task), backend, profile, cfg, out, on_step=lambda _: bar.update())
            except Exception as exc:  # one broken task must not stop the batch
                summary.failed.append(failure(task, exc))
                write_errors(out, summary.rejected + summary.failed)
                continue
            summary.done.append(task.id)
            summary.scenes += len(task.steps)
    summary.seconds = time.perf_counter() - start
    return summary


def profile_cache(cfg: RunConfig) -> Path:
    from cosed.models.profiles import default_cache_dir

    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
