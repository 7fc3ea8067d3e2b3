"""The run's pending tasks as a stream: the job holds a window of tasks, never the dataset.

The input is read a shard at a time (`cosed.shards.TaskStream`); its tasks are fingerprinted
and classified against the output's listings (`cosed.donemarks.ResumeIndex`, listed once) a
chunk at a time. Done tasks are counted as skipped, stale ones have their old parts removed,
and the rest come out of the feed in input order, for a runtime to pull as it has room
(`take`). Nothing here holds a `Task` beyond the chunk being classified and what a runtime
has pulled but not used (`peek`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from cosed import storage
from cosed.errors import UserError
from cosed.parts import PARTS, stale_parts
from cosed.shards import TaskStream
from cosed.scene_image import with_checked_images
from cosed.tasks import Task, TaskSet

log = logging.getLogger("cosed")

CHUNK = 1024  # tasks classified together: their unmarked manifests are read 16 at a time on S3


@dataclass(frozen=True)
class Pending:
    """A task to run, with the fingerprint its outputs are stored under."""

    task: Task
    fingerprint: str


@contextmanager
def input_errors(tasks_uri: str):
    """The input's I/O errors as one-line user errors naming the path."""
    try:
        yield
    except FileNotFoundError as exc:
        raise UserError(f"task file not found: {tasks_uri}") from exc
    except IsADirectoryError as exc:
        raise UserError(f"the tasks path is a folder, not a file: {tasks_uri}") from exc
    except PermissionError as exc:
        raise UserError(f"cannot read the task file {tasks_uri}: permission denied") from exc


@dataclass
class TaskFeed:
    """Pending tasks of one run, pulled lazily; fills ``summary`` (fingerprints, skipped, stale, rejected)
    as the input is read. ``fingerprint`` maps a task to its fingerprint under the run's plan."""

    tasks_uri: str
    stream: TaskStream
    index: object  # cosed.donemarks.ResumeIndex
    summary: object  # cosed.runner.RunSummary
    fingerprint: object  # Callable[[Task], str]
    chunk: int = CHUNK
    exhausted: bool = False
    seen: int = 0  # valid tasks read so far
    buffer: deque = field(default_factory=deque)  # pulled from the input, not yet taken
    parts: set[str] = field(default_factory=set)  # task folders with parts, from one listing at the start
    _pending: Iterator[Pending] | None = None
    _errors_seen: int = 0

    def __post_init__(self):
        self._pending = self._classify()

    @classmethod
    def open(cls, tasks_uri: str, out: str, max_steps: int, overwrite: bool, summary, fingerprint,
             chunk: int = CHUNK) -> "TaskFeed":
        from cosed.donemarks import ResumeIndex

        with input_errors(tasks_uri):
            stream = TaskStream(tasks_uri, max_steps)
        root = storage.join(out, PARTS)
        parts = {uri[len(root) + 1:].replace("\\", "/").split("/", 1)[0] for uri in storage.list_keys(root)}
        return cls(tasks_uri, stream, ResumeIndex.listed(out, overwrite), summary, fingerprint, chunk, parts=parts)

    # -- pulling -----------------------------------------------------------------------------------------
    def take(self, n: int) -> list[Pending]:
        """Up to ``n`` pending tasks, in input order (fewer only at the end of the input)."""
        self._fill(n)
        return [self.buffer.popleft() for _ in range(min(n, len(self.buffer)))]

    def peek(self, n: int) -> list[Pending]:
        """The next ``n`` pending tasks without taking them (a sample to plan with)."""
        self._fill(n)
        return list(itertools.islice(self.buffer, n))

    def __iter__(self) -> Iterator[Pending]:
        while True:
            batch = self.take(1)
            if not batch:
                return
            yield batch[0]

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n and not self.exhausted:
            try:
                self.buffer.append(next(self._pending))
            except StopIteration:
                self.exhausted = True

    # -- estimates -----------------------------------------------------------------------------------------
    def estimated_pending(self) -> int:
        """Pending tasks left, taken or not: exact once the input is read, else the shards not read yet
        assumed like those read (same tasks per shard, same share already done)."""
        done = len(self.summary.skipped)
        pending_share = (self.seen - done) / self.seen if self.seen else 1.0
        unread_tasks = self.stream.mean_shard_tasks() * self.stream.unread_shards() + self.stream.left_in_shard()
        return len(self.buffer) + round(unread_tasks * pending_share)

    # -- classification --------------------------------------------------------------------------------------
    def _classify(self) -> Iterator[Pending]:
        summary = self.summary
        with input_errors(self.tasks_uri):
            chunks = _chunked(iter(self.stream), self.chunk)
            while True:
                chunk = next(chunks, None)
                self._take_errors()
                if chunk is None:
                    break
                chunk = self._with_readable_images(chunk)
                self.seen += len(chunk)
                fingerprints = {t.id: self.fingerprint(t) for t in chunk}
                summary.fingerprints.update(fingerprints)
                todo, done, stale = self.index.scan(chunk, fingerprints)
                summary.skipped += [t.id for t in done]
                summary.stale += [t.id for t in stale]
                for task in stale:  # unfinished parts stored under the task's old fingerprint can never be read again
                    log.warning("task %s: its manifest is from other inputs or config; redoing it (its files stay "
                                "until the new ones are complete)", task.id)
                    for uri in stale_parts(self.out, task.folder, fingerprints[task.id]):
                        storage.delete(uri)
                for task in done:  # a job stopped while removing a written task's parts
                    if task.folder in self.parts:
                        for uri in storage.list_keys(storage.join(self.out, PARTS, task.folder)):
                            storage.delete(uri)
                chunk = done = stale = None
                for task in todo:
                    yield Pending(task, fingerprints[task.id])
        if not self.seen and not summary.rejected:
            raise UserError(f"the task file {self.tasks_uri} holds no tasks")

    @property
    def out(self) -> str:
        return self.index.out

    def _with_readable_images(self, chunk: list[Task]) -> list[Task]:
        """The chunk's tasks whose scene image (if any) reads and decodes; the others are rejected, each alone."""
        checked = with_checked_images(TaskSet(tasks=chunk))
        self.summary.rejected += checked.errors
        return checked.tasks

    def _take_errors(self) -> None:
        new = self.stream.errors[self._errors_seen:]
        self._errors_seen += len(new)
        self.summary.rejected += new


def _chunked(items: Iterator[Task], size: int) -> Iterator[list[Task]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
