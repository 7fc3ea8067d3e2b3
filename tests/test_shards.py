"""Sharded, streamed input (`cosed.shards`) and resume by listing (`cosed.donemarks`)."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from cosed import shards, storage
from cosed.cli import main
from cosed.config import RunConfig
from cosed.donemarks import list_marks, mark_done, marker_uri
from cosed.errors import UserError
from cosed.runner import pending_tasks, read_tasks
from cosed.tasks import Task

from conftest import SMALL_TASKS, outputs, write_jsonl
from test_failures import s3_mock  # noqa: F401  (a fixture)

SAUCE, SHELF, TEA = SMALL_TASKS


def write_parquet(path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)


def mixed_prefix(root):
    """a.jsonl (a bad line, a task without steps), b.json (recipes layout), c.parquet (an empty step list and
    the id of a task in a.jsonl), plus a file that is no shard."""
    root.mkdir()
    (root / "a.jsonl").write_text(json.dumps(SAUCE) + "\n{not json\n" + json.dumps({"id": "nosteps"}) + "\n")
    (root / "b.json").write_text(json.dumps({"tea": {k: v for k, v in TEA.items() if k != "id"}}))
    write_parquet(root / "c.parquet", [SHELF, {"id": "empty", "title": "x", "steps": []},
                                       {"id": "sauce", "title": "again", "steps": ["Stir."]}])
    (root / "notes.txt").write_text("not a shard")
    return root


def test_a_prefix_of_jsonl_json_and_parquet_reads_the_good_tasks_and_names_each_errors_shard_and_line(tmp_path):
    root = mixed_prefix(tmp_path / "in")
    task_set = read_tasks(str(root), RunConfig(max_steps=12))
    assert [t.id for t in task_set.tasks] == ["sauce", "tea", "shelf"]
    assert {(e.source, e.line, e.field) for e in task_set.errors} == {
        (str(root / "a.jsonl"), 2, None), (str(root / "a.jsonl"), 3, "steps"),
        (str(root / "c.parquet"), 2, "steps"), (str(root / "c.parquet"), 3, "id")}
    assert "duplicate id 'sauce'" in next(e.reason for e in task_set.errors if e.field == "id")
    counts = shards.count_tasks(str(root), 12)
    assert counts.tasks == 4 and counts.histogram() == {1: 1, 2: 1, 3: 2}  # a first pass counts records, not ids


def test_generate_over_a_mixed_prefix_finishes_the_good_tasks(tmp_path, tiny_cache, clean_outputs):
    root, out = mixed_prefix(tmp_path / "in"), tmp_path / "out"
    (root / "a.jsonl").write_text("{not json\n")
    (root / "c.parquet").unlink()
    write_jsonl(root / "c.jsonl", [{**SAUCE, "id": "tea"}])  # b.json's tea came first
    assert main(["generate", "--tasks", str(root), "--out", str(out), "--no-ray", "--profile", "tiny",
                 "--preset", "legacy", "--cache-dir", str(tiny_cache), "--quiet"]) == 1  # some tasks were rejected
    assert outputs(out) == clean_outputs("tiny", [TEA])
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["source"], e["line"]) for e in errors] == [(str(root / "a.jsonl"), 1), (str(root / "c.jsonl"), 1)]
    assert list_marks(str(out)) == {"tea": {json.loads((out / "tea" / "manifest.json").read_text())["fingerprint"]}}


def test_the_reader_holds_one_shard_at_a_time(tmp_path, monkeypatch):
    root = tmp_path / "in"
    root.mkdir()
    for shard in range(5):
        write_jsonl(root / f"part-{shard:05d}.jsonl", [{**TEA, "id": f"t{shard}-{i}"} for i in range(3)])
    reads = []
    real = shards.read_shard
    monkeypatch.setattr(shards, "read_shard", lambda uri, *a: reads.append(uri) or real(uri, *a))
    stream = shards.TaskStream(str(root), 12)
    assert reads == [] and len(stream.shards) == 5  # listed once, nothing read yet
    seen = []
    for task in stream:
        shard = int(task.id[1])
        assert len(reads) == shard + 1 and stream.held == 1  # the shard of this task, none ahead
        seen.append(task.id)
    assert len(seen) == 15 and stream.held == 0


def test_a_parquet_shard_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    write_parquet(tmp_path / "c.parquet", [SHELF])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"pip install 'cosed\[parquet\]'"):
        read_tasks(str(tmp_path), RunConfig())


def tasks_and_fingerprints(count: int) -> tuple[list[Task], dict[str, str]]:
    tasks = [Task(id=f"t{i:05d}", title="t", steps=("a",)) for i in range(count)]
    return tasks, {t.id: f"{i % 251:02x}{i:062x}" for i, t in enumerate(tasks)}


def finish(out: str, task: Task, fingerprint: str, marker: bool = True) -> None:
    """What assemble_task leaves of a finished task that the scan looks at: its manifest, then its marker."""
    storage.write_text(storage.join(out, task.folder, "manifest.json"), json.dumps({"fingerprint": fingerprint}))
    if marker:
        mark_done(out, task.folder, fingerprint)


def test_resume_on_s3_lists_markers_and_folders_instead_of_reading_manifests(s3_mock):
    # 2,000 tasks, not 20,000: moto lists about 1,000 keys a second, and the request count grows by one per
    # 1,000 markers and one per 1,000 folders either way.
    out = "s3://videos/run"
    tasks, fingerprints = tasks_and_fingerprints(2000)
    finished = tasks[:1900]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: finish(out, t, fingerprints[t.id]), finished))
    calls = []
    storage.s3_client().meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    todo, done, stale = pending_tasks(tasks, out, False, fingerprints)
    assert [t.id for t in todo] == [t.id for t in tasks[1900:]] and len(done) == 1900 and not stale
    assert calls == ["ListObjectsV2"] * 4  # 1,900 markers and 1,900 folders: two pages each, not 2,000 GETs


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_marker_without_its_manifest_redoes_and_a_manifest_without_a_marker_gets_one(where, tmp_path, request):
    out = str(tmp_path / "out") if where == "local" else "s3://videos/run"
    if where == "s3":
        request.getfixturevalue("s3_mock")
    tasks, fingerprints = tasks_and_fingerprints(4)
    lost, old, kept, stale = tasks
    mark_done(out, lost.folder, fingerprints[lost.id])  # its folder (manifest) was removed by hand
    finish(out, old, fingerprints[old.id], marker=False)  # finished before markers existed
    finish(out, kept, fingerprints[kept.id])
    finish(out, stale, "0" * 64)  # finished under another config
    todo, done, stale_found = pending_tasks(tasks, out, False, fingerprints)
    assert [t.id for t in todo] == [lost.id, stale.id] and [t.id for t in done] == [old.id, kept.id]
    assert [t.id for t in stale_found] == [stale.id]
    assert list_marks(out) == {old.folder: {fingerprints[old.id]}, kept.folder: {fingerprints[kept.id]}}
    assert not storage.exists(marker_uri(out, stale.folder, "0" * 64))


def test_overwrite_removes_the_markers_of_the_tasks_it_redoes(tmp_path):
    out = str(tmp_path / "out")
    tasks, fingerprints = tasks_and_fingerprints(2)
    for task in tasks:
        finish(out, task, fingerprints[task.id])
    todo, done, _ = pending_tasks(tasks, out, True, fingerprints)
    assert todo == tasks and not done and list_marks(out) == {}  # a redo stopped halfway leaves no marker


def test_the_feed_streams_a_prefix_on_s3_a_shard_at_a_time_and_resumes_by_listing(s3_mock):
    """2,000 tasks in 4 shards, 1,900 of them done: the first pending tasks come out after one shard is read;
    the whole pass holds one shard at a time and costs the shard listing, the shards' GETs, the output's
    listings (markers, folders, parts) and nothing per task."""
    from cosed.feed import TaskFeed
    from cosed.runner import RunSummary

    out = "s3://videos/run"
    tasks, fingerprints = tasks_and_fingerprints(2000)
    for shard in range(4):
        storage.write_text(f"s3://videos/in/part-{shard}.jsonl", "".join(
            json.dumps({"id": t.id, "title": t.title, "steps": list(t.steps)}) + "\n"
            for t in tasks[shard * 500:(shard + 1) * 500]))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: finish(out, t, fingerprints[t.id]), tasks[100:]))  # all but the first 100
    calls = []
    storage.s3_client().meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    summary = RunSummary(out=out)
    feed = TaskFeed.open("s3://videos/in/", out, 12, False, summary, lambda task: fingerprints[task.id], chunk=250)
    first = feed.take(50)
    assert [p.task.id for p in first] == [t.id for t in tasks[:50]] and feed.stream.read == 1
    assert 50 <= feed.estimated_pending() <= 1950  # an estimate from what was read: the rest assumed alike
    rest, held = [], set()
    while batch := feed.take(64):
        rest += batch
        held.add(feed.stream.held)
    assert [p.task.id for p in first + rest] == [t.id for t in tasks[:100]] and held <= {0, 1}
    assert len(summary.skipped) == 1900 and not summary.stale and feed.exhausted and feed.estimated_pending() == 0
    assert sorted(calls) == sorted(["ListObjectsV2"] * 6 + ["GetObject"] * 4)  # shards 1, markers 2, folders 2, parts 1
