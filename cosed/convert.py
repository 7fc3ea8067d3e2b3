"""`cosed tasks convert`: task files between the layouts people have, chosen by extension.

- ``.jsonl``: one task a line, the layout `cosed generate` reads best (README, *Your own recipes*);
- ``.json``: the recipes layout of the shared data set, an object keyed by id, each with ``title``,
  ``steps`` and optionally the authors' captions ``steps_generated``;
- ``.csv``: a spreadsheet of steps, one step a row, in order: ``id,title,step`` and optionally ``caption``.

Every task read is validated as `cosed generate` would (`cosed.tasks.parse_task`), so a converted file
holds only tasks that run; the rejects are returned with their line and reason.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath

from cosed import storage
from cosed.errors import UserError
from cosed.tasks import InvalidTask, Task, TaskError, TaskSet, parse_task, parse_tasks

LAYOUTS = (".jsonl", ".json", ".csv")
CSV_COLUMNS = ("id", "title", "step", "caption")


def layout(uri: str) -> str:
    suffix = PurePosixPath(uri.split("?")[0]).suffix.lower()
    if suffix not in LAYOUTS:
        raise UserError(f"{uri}: the layout is chosen by extension, one of {', '.join(LAYOUTS)}")
    return suffix


def read_csv(data: bytes, source: str, max_steps: int) -> TaskSet:
    """Steps as rows (``id,title,step[,caption]``), grouped by id in the order they come."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return TaskSet(errors=[TaskError(source=source, reason=f"not UTF-8 ({exc.reason} at byte {exc.start})")])
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in CSV_COLUMNS[:3] if c not in (reader.fieldnames or [])]
    if missing:
        return TaskSet(errors=[TaskError(source=source, line=1, reason=f"missing column(s) {', '.join(missing)}: "
                                         f"the header must name {', '.join(CSV_COLUMNS[:3])}[,caption]")])
    records: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        task_id = (row.get("id") or "").strip()
        record = records.setdefault(task_id, {"id": task_id, "title": row.get("title") or "", "steps": []})
        first_line.setdefault(task_id, reader.line_num)
        record["steps"].append(row.get("step") or "")
        if (row.get("caption") or "").strip():
            record.setdefault("captions", []).append(row["caption"])
    out = TaskSet()
    for task_id, record in records.items():
        try:
            out.tasks.append(parse_task(record, max_steps=max_steps))
        except InvalidTask as exc:
            out.errors.append(TaskError(source=source, task_id=task_id or None, line=first_line[task_id],
                                        field=exc.field, reason=exc.reason))
    return out


def read(uri: str, max_steps: int) -> TaskSet:
    data = storage.read_bytes(uri)
    return read_csv(data, uri, max_steps) if layout(uri) == ".csv" else parse_tasks(data, source=uri,
                                                                                    max_steps=max_steps)


def record(task: Task) -> dict:
    """A task as its JSONL line: the schema's fields, the optional ones only where set."""
    data = {"id": task.id, "title": task.title, "steps": list(task.steps)}
    for name in ("description", "ingredients", "tools", "step_images", "captions"):
        value = getattr(task, name)
        if value:
            data[name] = value if isinstance(value, str) else list(value)
    return data


def render(tasks: list[Task], target_layout: str) -> str:
    if target_layout == ".jsonl":
        return "".join(json.dumps(record(t), ensure_ascii=False) + "\n" for t in tasks)
    if target_layout == ".json":
        document = {}
        for task in tasks:
            entry = {k: v for k, v in record(task).items() if k not in ("id", "captions")}
            if task.captions:
                entry["steps_generated"] = list(task.captions)
            document[task.id] = entry
        return json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    text = io.StringIO(newline="")
    writer = csv.writer(text)  # RFC 4180 line ends: a field holding \r or \n is quoted
    writer.writerow(CSV_COLUMNS if any(t.captions for t in tasks) else CSV_COLUMNS[:3])
    for task in tasks:
        for index, step in enumerate(task.steps):
            writer.writerow([task.id, task.title, step] + ([task.captions[index]] if task.captions else []))
    return text.getvalue()


def convert(source: str, target: str, max_steps: int = 1000) -> TaskSet:
    """Read ``source``, write its valid tasks to ``target``; returns what was read (tasks and rejects)."""
    target_layout = layout(target)
    read_set = read(source, max_steps)
    if target_layout == ".csv" and any(t.description or t.ingredients or t.tools or t.step_images
                                       for t in read_set.tasks):
        raise UserError(f"{target}: the CSV layout holds id, title, steps and captions only; "
                        "convert to .jsonl to keep descriptions, ingredients, tools and step images")
    storage.write_text(target, render(read_set.tasks, target_layout))
    return read_set
