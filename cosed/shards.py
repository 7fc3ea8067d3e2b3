"""Task input as a file or a prefix of shards, read lazily one shard at a time.

A dataset bucket is a prefix of shards (``s3://bucket/recipes/part-00000.jsonl`` …, often
Parquet). The shards are listed once, sorted, and read one at a time, so a consumer that
pulls tasks as it needs them holds one shard's tasks, never the whole dataset. Each error
keeps its shard (``source``) and line (for Parquet: its row, from 1); task ids are unique
across shards (a later duplicate is that line's error). `count_tasks` is the cheap first
pass (step counts only, no `Task` objects) for progress and `cosed plan`.
"""

from __future__ import annotations

import io
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cosed import storage
from cosed.errors import UserError
from cosed.tasks import Task, TaskError, TaskSet, collect_records, parse_tasks, recipe_record

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_EXTRA = "reading Parquet shards needs pyarrow: pip install 'cosed[parquet]'"


def list_shards(uri: str) -> list[str]:
    """``[uri]`` for one file (read as today, whatever its name), else the shards below the prefix, sorted.

    An S3 URI named like a shard is one object (no request spent asking); one ending in ``/`` is a prefix.
    Raises FileNotFoundError when there is neither, UserError for a local folder without a shard.
    """
    if storage.is_s3(uri):
        if uri.lower().endswith(SHARD_SUFFIXES) or (not uri.endswith("/") and storage.size(uri) is not None):
            return [uri]
    elif Path(uri).is_file():
        return [uri]
    elif not Path(uri).is_dir():
        raise FileNotFoundError(uri)
    shards = [key for key in storage.list_keys(uri)
              if key.lower().endswith(SHARD_SUFFIXES) and not Path(key).name.startswith(".")]
    if not shards:
        if storage.is_s3(uri):
            raise FileNotFoundError(uri)
        raise UserError(f"the tasks path is a folder without {', '.join(SHARD_SUFFIXES)} shards: {uri}")
    return shards


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(PARQUET_EXTRA) from None
    return pq


def _parquet_file(uri: str):
    pq = _pyarrow_parquet()
    return pq.ParquetFile(io.BytesIO(storage.read_bytes(uri)) if storage.is_s3(uri) else uri)


def _parquet_records(uri: str) -> Iterator[tuple[int, None, Any]]:
    """(row from 1, None, record) per row, one row group in memory at a time; nulls are absent fields."""
    parquet = _parquet_file(uri)
    row = 0
    for group in range(parquet.num_row_groups):
        for record in parquet.read_row_group(group).to_pylist():
            row += 1
            yield row, None, recipe_record({k: v for k, v in record.items() if v is not None})


def read_shard(uri: str, max_steps: int, folders: set[str] | None = None) -> TaskSet:
    """One shard's valid tasks and errors; ``folders`` carries the ids seen in earlier shards."""
    if uri.lower().endswith(".parquet"):
        return collect_records(_parquet_records(uri), uri, max_steps, folders)
    return parse_tasks(storage.read_bytes(uri), source=uri, max_steps=max_steps, folders=folders)


@dataclass
class TaskStream:
    """The tasks of a file or prefix, pulled lazily: iterating reads one shard at a time.

    ``errors`` fills as shards are read; ``held`` is how many shards' tasks this stream holds
    now (at most one, while iterating), for tests and benchmarks. ``read`` and ``read_tasks``
    (shards read, and their valid tasks) and ``left`` (tasks of the current shard not yet
    handed out) let a consumer estimate what is to come without a first pass.
    """

    uri: str
    max_steps: int
    shards: list[str] = field(default_factory=list)
    errors: list[TaskError] = field(default_factory=list)
    held: int = 0
    read: int = 0
    read_tasks: int = 0
    left: int = 0

    def __post_init__(self):
        self.shards = self.shards or list_shards(self.uri)

    def __iter__(self) -> Iterator[Task]:
        folders: set[str] = set()
        for shard in self.shards:
            task_set = read_shard(shard, self.max_steps, folders)
            self.errors += task_set.errors
            tasks, task_set = task_set.tasks, None
            self.held, self.read, self.read_tasks, self.left = 1, self.read + 1, self.read_tasks + len(tasks), len(tasks)
            try:
                for index, task in enumerate(tasks):
                    tasks[index] = None  # the consumer alone decides how long a handed-out task lives
                    self.left -= 1
                    yield task
            finally:
                tasks, self.held = None, 0

    def mean_shard_tasks(self) -> float:
        return self.read_tasks / self.read if self.read else 0.0

    def unread_shards(self) -> int:
        return len(self.shards) - self.read

    def left_in_shard(self) -> int:
        return self.left


@dataclass
class InputCounts:
    """The first pass: each record's step count, in input order (2 bytes a task), per shard."""

    shards: list[str]
    steps: array = field(default_factory=lambda: array("H"))

    @property
    def tasks(self) -> int:
        return len(self.steps)

    def histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.steps).items()))


def count_tasks(uri: str, max_steps: int) -> InputCounts:
    """Step counts without building tasks: JSONL is decoded line by line, a JSON document whole (it is one
    shard), Parquet reads only its ``steps`` column. Counts records whose ``steps`` is a list of 1 to
    ``max_steps`` entries: a close, cheap figure (the full validation happens when the tasks are read)."""
    counts = InputCounts(list_shards(uri))
    for shard in counts.shards:
        counts.steps.extend(n for n in _step_counts(shard) if 0 < n <= max_steps)
    return counts


def _step_counts(uri: str) -> Iterator[int]:
    if uri.lower().endswith(".parquet"):
        import pyarrow.compute as pc

        parquet = _parquet_file(uri)
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=["steps"]).column("steps")
            yield from (n or 0 for n in pc.list_value_length(column).to_pylist())
        return
    data = storage.read_bytes(uri).removeprefix(b"\xef\xbb\xbf")
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if isinstance(document, dict) and "steps" in document:
            document = [document]
        elif isinstance(document, dict):
            document = list(document.values())
        if isinstance(document, list):
            yield from (_steps_of(record) for record in document)
            return
    for line in data.split(b"\n"):
        if line.strip():
            try:
                yield _steps_of(json.loads(line))
            except ValueError:
                yield 0


def _steps_of(record: Any) -> int:
    steps = record.get("steps") if isinstance(record, dict) else None
    return len(steps) if isinstance(steps, list) else 0
