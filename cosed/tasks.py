"""Task schema, readers for JSONL and the recipes JSON layout, and validation.

Readers never raise on a bad task: they return the valid tasks plus a list of
`TaskError`s so that one broken line cannot stop a batch of thousands.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

_OPTIONAL_LIST_FIELDS = ("ingredients", "tools", "step_images")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PLAIN_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")

# Run-level names in OUT: no task folder may take one of them (compared case-insensitively).
SUMMARY = "summary.json"
ERRORS = "errors.jsonl"
ERRORS_DIR = "errors"
LEASE = ".cosed-lease.json"
CAPTIONS = ".cosed-captions"  # the lm rewriter's caption cache, shared by every node and every run of this output
DONE = ".cosed-done"  # done markers, listed by the resume scan (`cosed.donemarks`)
RESERVED_NAMES = frozenset({SUMMARY, ERRORS, ERRORS_DIR, LEASE, CAPTIONS, DONE, ".cosed-parts", "report.html", "metrics.csv", "plots", "logs",
                            "selector.safetensors", "selector.json", "independent", "previous", "chain",
                            "cosed", "mora", "t2v", "talc"})

MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 300
MAX_STEP_CHARS = 2000
MAX_DESCRIPTION_CHARS = 10000


@dataclass(frozen=True)
class Task:
    """One instructional task: a title and its ordered steps (numbered from 1)."""

    id: str
    title: str
    steps: tuple[str, ...]
    description: str = ""
    ingredients: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    step_images: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()
    scene_image: str = ""  # the user's own scene (path or s3:// URI, PNG or JPEG): step 0, `cosed.scene_image`

    @property
    def folder(self) -> str:
        return task_folder_name(self.id)


@dataclass(frozen=True)
class TaskError:
    """Why one input task was rejected: which task (or line), which field, why."""

    source: str
    reason: str
    task_id: str | None = None
    line: int | None = None
    field: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "line": self.line, "field": self.field,
                "reason": self.reason, "source": self.source}

    def __str__(self) -> str:
        where = f"task {self.task_id!r}" if self.task_id is not None else "input"
        if self.line is not None:
            where += f" (line {self.line})"
        if self.field:
            where += f", field {self.field!r}"
        return f"{self.source}: {where}: {self.reason}"


class InvalidTask(ValueError):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def task_folder_name(task_id: str) -> str:
    """The folder a task's outputs go to: the id itself when it is plain lowercase ASCII,
    else a readable sanitised name plus a short hash of the id.

    So no two ids share a folder, even on a case-insensitive file system, and no
    task takes a run-level name; ids that look like paths out of the output are refused.
    """
    if not task_id or task_id.strip() != task_id:
        raise InvalidTask("id", "id must be a non-empty string without surrounding spaces")
    if len(task_id) > MAX_ID_CHARS:
        raise InvalidTask("id", f"id is {len(task_id)} characters, more than {MAX_ID_CHARS}")
    if task_id.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[/\\]", task_id):
        raise InvalidTask("id", f"id {task_id!r} is an absolute path")
    parts = re.split(r"[/\\]", task_id)
    if any(part in ("..", ".") for part in parts):
        raise InvalidTask("id", f"id {task_id!r} would escape the output folder")
    if _PLAIN_ID.fullmatch(task_id) and len(task_id) <= 64 and task_id not in RESERVED_NAMES:
        return task_id
    ascii_name = unicodedata.normalize("NFKD", task_id).encode("ascii", "ignore").decode("ascii")
    readable = _UNSAFE.sub("_", ascii_name).strip("._")[:48] or "task"
    return f"{readable}-{hashlib.sha256(task_id.encode('utf-8')).hexdigest()[:10]}"


def _text(value: str, field: str) -> str:
    """``value`` when it is text that can be written out (JSON's ``\\ud800`` escapes decode to lone surrogates,
    which no UTF-8 file, folder name or S3 key can hold)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTask(field, f"not valid Unicode text ({exc.reason} at character {exc.start})") from None
    return value


def parse_task(record: Any, *, max_steps: int, default_id: str | None = None) -> Task:
    """Validate one decoded record; raises InvalidTask naming the field at fault."""
    if not isinstance(record, dict):
        raise InvalidTask(None, f"a task must be a JSON object, got {type(record).__name__}")
    for key in record:
        _text(key, None)  # a key that cannot be written out is named by the reason, not as the field
    task_id = record.get("id", default_id)
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)
    if not isinstance(task_id, str):
        raise InvalidTask("id", "missing or not a string")
    task_folder_name(_text(task_id, "id"))
    title = record.get("title", "")
    if not isinstance(title, str):
        raise InvalidTask("title", "must be a string")
    _text(title, "title")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidTask("title", f"{len(title)} characters, more than {MAX_TITLE_CHARS}")
    if "steps" not in record:
        raise InvalidTask("steps", "missing")
    steps = record["steps"]
    if not isinstance(steps, list) or not steps:
        raise InvalidTask("steps", "must be a non-empty list of strings")
    for number, text in enumerate(steps, start=1):
        if not isinstance(text, str):
            raise InvalidTask(f"steps[{number}]", f"step {number} is {type(text).__name__}, not a string")
        _text(text, f"steps[{number}]")
        if not text.strip():
            raise InvalidTask(f"steps[{number}]", f"step {number} is empty")
        if len(text) > MAX_STEP_CHARS:
            raise InvalidTask(f"steps[{number}]",
                              f"step {number} is {len(text)} characters, more than {MAX_STEP_CHARS}")
    if len(steps) > max_steps:
        raise InvalidTask("steps", f"{len(steps)} steps, more than the configured maximum of {max_steps}")
    description = record.get("description", "")
    if not isinstance(description, str):
        raise InvalidTask("description", "must be a string")
    _text(description, "description")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidTask("description", f"{len(description)} characters, more than {MAX_DESCRIPTION_CHARS}")
    extra: dict[str, tuple[str, ...]] = {}
    for name in _OPTIONAL_LIST_FIELDS:
        value = record.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidTask(name, "must be a list of strings")
        extra[name] = tuple(_text(v, name) for v in value)
    if extra["step_images"] and len(extra["step_images"]) != len(steps):
        raise InvalidTask("step_images", f"{len(extra['step_images'])} images for {len(steps)} steps")
    return Task(id=task_id, title=title.strip(), steps=tuple(s.strip() for s in steps),
                description=description, **extra, captions=parse_captions(record.get("captions"), len(steps)),
                scene_image=parse_scene_image(record.get("scene_image")))


def parse_scene_image(value: Any) -> str:
    """The optional user's scene image: a local path or an s3:// URI (its bytes are checked when the run
    starts, `cosed.scene_image`)."""
    if value is None:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise InvalidTask("scene_image", "must be a non-empty string: a local path or an s3:// URI")
    _text(value, "scene_image")
    if len(value) > MAX_DESCRIPTION_CHARS:
        raise InvalidTask("scene_image", f"{len(value)} characters, more than {MAX_DESCRIPTION_CHARS}")
    if "://" in value and not value.startswith("s3://"):
        raise InvalidTask("scene_image", f"{value!r}: only local paths and s3:// URIs are read")
    return value.strip()


def parse_captions(captions: Any, n_steps: int) -> tuple[str, ...]:
    """Optional visual captions, one non-empty string per step (the ``given`` rewriter uses them)."""
    if captions is None:
        return ()
    if not isinstance(captions, list):
        raise InvalidTask("captions", "must be a list of strings, one per step")
    for number, text in enumerate(captions, start=1):
        if not isinstance(text, str):
            raise InvalidTask(f"captions[{number}]", f"caption {number} is {type(text).__name__}, not a string")
        _text(text, f"captions[{number}]")
        if not text.strip():
            raise InvalidTask(f"captions[{number}]", f"caption {number} is empty")
    if len(captions) != n_steps:
        raise InvalidTask("captions", f"{len(captions)} captions for {n_steps} steps")
    return tuple(c.strip() for c in captions)


def recipe_record(record: Any) -> Any:
    """The recipes layout names the authors' per-step captions ``steps_generated``."""
    if isinstance(record, dict) and "steps_generated" in record and "captions" not in record:
        return {**record, "captions": record["steps_generated"]}
    return record


@dataclass
class TaskSet:
    tasks: list[Task] = field(default_factory=list)
    errors: list[TaskError] = field(default_factory=list)


def collect_records(records: Iterable[tuple[int | None, str | None, Any]], source: str, max_steps: int,
                    folders: set[str] | None = None) -> TaskSet:
    """Validate (line, default id, record) triples. ``folders`` (the lowercased folders of tasks read so far)
    is shared across the shards of one input, so a later duplicate in another shard is that line's error."""
    out = TaskSet()
    folders = set() if folders is None else folders
    for line, default_id, record in records:
        task_id = _reported_id(record, default_id)
        try:
            if isinstance(record, _Unreadable):
                raise InvalidTask(None, str(record))
            task = parse_task(record, max_steps=max_steps, default_id=default_id)
            if task.folder.lower() in folders:  # the same id always gives the same folder
                raise InvalidTask("id", f"duplicate id {task.id!r} (an earlier task has the same id or folder)")
        except InvalidTask as exc:
            out.errors.append(TaskError(source=source, task_id=task_id, line=line, field=exc.field, reason=exc.reason))
            continue
        except Exception as exc:  # noqa: BLE001  whatever one record does to validation is that record's error
            out.errors.append(TaskError(source=source, task_id=task_id, line=line, field=None,
                                        reason=f"unreadable task ({type(exc).__name__})"))
            continue
        folders.add(task.folder.lower())
        out.tasks.append(task)
    return out


def _reported_id(record: Any, default_id: str | None) -> str | None:
    """The id an error names: the record's own when it is printable text, else the default."""
    value = record.get("id") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return default_id
    try:
        text = str(value)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return default_id
    return text[:MAX_ID_CHARS + 1]


# What the JSON decoder can raise on hostile input besides JSONDecodeError: RecursionError (deep nesting),
# ValueError (an integer past Python's digit limit), MemoryError (a number or string too large to hold).
_DECODE_ERRORS = (ValueError, RecursionError, MemoryError)


def _decode(text: str) -> Any:
    """One JSON value, or `_Unreadable` saying why not (never an exception)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _Unreadable(f"invalid JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return _Unreadable("invalid JSON: nested too deeply")
    except _DECODE_ERRORS as exc:
        return _Unreadable(f"invalid JSON: {str(exc).splitlines()[0][:200] or type(exc).__name__}")


def parse_tasks(data: bytes, *, source: str, max_steps: int, folders: set[str] | None = None) -> TaskSet:
    """Read JSONL (one task per line) or a JSON document (recipes layout or a list); a UTF-8 BOM is fine.

    A document is parsed as a document: one bad record is one error, not every line.
    A file that is neither a valid document nor has any line holding a JSON object
    is one error (a broken document), not one per line. ``folders``: see `collect_records`.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    if data.lstrip()[:1] in (b"{", b"["):
        try:
            document = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            document = None
        except json.JSONDecodeError as exc:
            document = None
            if not any(_is_object(raw) for raw in data.split(b"\n")):
                return TaskSet(errors=[TaskError(source=source, line=exc.lineno,
                                                 reason=f"invalid JSON document: {exc.msg} at column {exc.colno}")])
        except _DECODE_ERRORS:
            document = None  # read it line by line: each line's trouble is that line's error
        if isinstance(document, list):
            return collect_records(((None, None, r) for r in document), source, max_steps, folders)
        if isinstance(document, dict) and "steps" not in document:
            return collect_records(((None, str(k), recipe_record(v)) for k, v in document.items()), source, max_steps,
                                   folders)
        if isinstance(document, dict):  # one task, possibly spread over several lines
            return collect_records([(1, None, document)], source, max_steps, folders)
    return collect_records(_jsonl_records(data), source, max_steps, folders)


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(_decode(raw.decode("utf-8")), dict)
    except UnicodeDecodeError:
        return False


def _jsonl_records(data: bytes) -> Iterable[tuple[int | None, str | None, Any]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, None, _Unreadable(f"line is not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        yield number, None, _decode(text)


class _Unreadable(str):
    """A line that could not be decoded; parse_task rejects it with its reason."""
