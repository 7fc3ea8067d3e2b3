"""Done markers: a resume finds finished tasks by listing, not by reading every manifest.

Right after a task's manifest is written, an empty object is written at
``OUT/.cosed-done/<fp[:2]>/<fp>/<task folder>`` (``fp``: the task's fingerprint). The key
alone says which task is done under which inputs and config, so a resume LISTs the
markers (1,000 keys a request on S3) instead of GETting a million manifests. The two
hex characters spread the keys over S3's partitions.

A marker is never trusted blindly. The scan also lists the task folders (one LIST per
1,000 folders, by delimiter, never their files) and, locally, checks the marked manifest
itself (a stat): a marker whose folder (local: manifest) is gone makes its task redo.
Every path of cosed's own that withdraws a manifest (a stale task's redo, ``--overwrite``)
first passes through this scan, which removes that task's markers before anything runs,
so a redo stopped halfway leaves no marker behind. What the listing cannot see on S3 is a
manifest deleted by hand from a folder that keeps its other files: delete the task's
folder (or its marker) to redo a task. An unmarked task whose folder exists (outputs
from before the markers, or an unfinished task's parts) has its manifest read once, and
a matching one gets its marker then (migration).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cosed import storage
from cosed.parts import MANIFEST, task_uri
from cosed.tasks import DONE, Task


def marker_uri(out: str, folder: str, fingerprint: str) -> str:
    return storage.join(out, DONE, fingerprint[:2], fingerprint, folder)


def mark_done(out: str, folder: str, fingerprint: str, write: Callable[[str, bytes], None] = storage.write_bytes
              ) -> None:
    """Called right after the task's manifest is written (`cosed.engine.assemble_task`), with the same
    ``write`` (the output lease's fenced write, where there is one)."""
    write(marker_uri(out, folder, fingerprint), b"")


def list_marks(out: str) -> dict[str, set[str]]:
    """folder -> the fingerprints it has markers for, from one listing of the marker prefix."""
    root = storage.join(out, DONE)
    marks: dict[str, set[str]] = {}
    for uri in storage.list_keys(root):
        parts = uri[len(root) + 1:].replace("\\", "/").split("/")
        if len(parts) == 3 and not parts[2].startswith("."):  # a local write's temporary file starts with "."
            marks.setdefault(parts[2], set()).add(parts[1])
    return marks


def _manifest_state(out: str, task: Task, fingerprint: str) -> str:
    """'done', 'stale' or 'todo' from the task's manifest itself (one GET)."""

    try:
        manifest = json.loads(storage.read_bytes(task_uri(out, task, MANIFEST)))
    except FileNotFoundError:
        return "todo"
    except (ValueError, UnicodeDecodeError):
        manifest = {}
    return "done" if isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint else "stale"


def _marked_manifest_present(out: str, folder: str) -> bool:
    """Locally a stat is free, so the marked manifest itself is checked; on S3 the folder listing stands in."""

    return storage.is_s3(out) or Path(out, folder, MANIFEST).is_file()


@dataclass
class ResumeIndex:
    """The output's two listings, taken once at the start of a run: the done markers of each task folder
    that exists, and the folders without a marker. A streamed input is classified against it a chunk at a
    time (`scan`), so a resume lists the output once whatever the number of shards or windows.
    Memory: one entry per existing task folder (its marked fingerprints), none per task of the input."""

    out: str
    overwrite: bool
    marks: dict[str, str] = field(default_factory=dict)  # folder -> its marked fingerprints, ","-joined
    unmarked: set[str] = field(default_factory=set)  # folders that exist with no marker
    orphans: dict[str, set[str]] = field(default_factory=dict)  # markers whose folder is gone (removed if met)

    @classmethod
    def listed(cls, out: str, overwrite: bool) -> "ResumeIndex":
        index = cls(out, overwrite)
        marks = list_marks(out)
        for folder in () if overwrite else storage.list_folders(out):  # overwrite: every task redone, unmarked
            if folder in marks:
                index.marks[folder] = ",".join(sorted(marks.pop(folder)))
            else:
                index.unmarked.add(folder)
        index.orphans = marks  # markers whose folder is gone: their tasks are redone, the markers removed
        return index

    def marked(self, folder: str) -> set[str]:
        joined = self.marks.get(folder) or ""
        return set(joined.split(",")) if joined else set(self.orphans.get(folder, ()))

    def scan(self, tasks: list[Task], fingerprints: dict[str, str]) -> tuple[list[Task], list[Task], list[Task]]:
        """(to run, already done, stale) of ``tasks``, repairing markers on the way: a task to run or redo
        keeps no marker; a done task found by its manifest gets one. Requests: one GET per unmarked task
        whose folder exists, and the repairs."""
        out = self.out
        folder_of = {task.id: task.folder for task in tasks}  # a folder name is worked out, not stored
        states: dict[str, str] = {}
        unmarked: list[Task] = []
        for task in tasks:
            folder = folder_of[task.id]
            if self.overwrite or (folder not in self.marks and folder not in self.unmarked):
                states[task.id] = "todo"
            elif fingerprints[task.id] in self.marked(folder) and _marked_manifest_present(out, folder):
                states[task.id] = "done"
            else:
                unmarked.append(task)
        workers = 16 if storage.is_s3(out) else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = list(pool.map(lambda t: _manifest_state(out, t, fingerprints[t.id]), unmarked))
            states.update((task.id, state) for task, state in zip(unmarked, found))
            repairs = [task for task in tasks if _needs_repair(self.marked(folder_of[task.id]),
                                                               fingerprints[task.id], states[task.id] == "done")]
            list(pool.map(lambda t: _repair(out, self.marked(folder_of[t.id]), folder_of[t.id], fingerprints[t.id],
                                            states[t.id] == "done"), repairs))
        done = [t for t in tasks if states[t.id] == "done"]
        stale = [t for t in tasks if states[t.id] == "stale"]
        return [t for t in tasks if states[t.id] != "done"], done, stale


def resume_scan(tasks: list[Task], out: str, overwrite: bool,
                fingerprints: dict[str, str]) -> tuple[list[Task], list[Task], list[Task]]:
    """(to run, already done, stale) of a list of tasks: `ResumeIndex.scan` over a fresh listing."""
    return ResumeIndex.listed(out, overwrite).scan(tasks, fingerprints)


def _needs_repair(marked: set[str], fingerprint: str, done: bool) -> bool:
    return bool(marked - {fingerprint}) or (fingerprint in marked) != done


def _repair(out: str, marked: set[str], folder: str, fingerprint: str, done: bool) -> None:
    """Leave exactly one marker for a done task (its fingerprint's) and none for a task to run or redo."""
    for other in marked - ({fingerprint} if done else set()):
        storage.delete(marker_uri(out, folder, other))
    if done and fingerprint not in marked:
        mark_done(out, folder, fingerprint)
