"""Generated task files (hypothesis): no input stops the batch.

Every generated file mixes good tasks (any Unicode id, title and steps) with bad
records of known kinds. Properties: never an exception; every bad record is
reported with its line, field and a reason; every good task is planned into its
own folder inside OUT (and, through the real runner, done); nothing is written
outside OUT.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosed import runner
from cosed.tasks import RESERVED_NAMES, parse_tasks

MAX_STEPS = 12
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
GOOD_ID = TEXT.filter(lambda s: s and s.strip() == s and "/" not in s and "\\" not in s and s not in (".", "..")
                      and not (len(s) > 1 and s[1] == ":"))
STEP = TEXT.filter(lambda s: s.strip())

# Each bad kind: (record maker from a line number, the field the error must name).
BAD_KINDS = {
    "missing steps": (lambda n: {"id": f"bad{n}", "title": "t"}, "steps"),
    "empty steps": (lambda n: {"id": f"bad{n}", "steps": []}, "steps"),
    "number step": (lambda n: {"id": f"bad{n}", "steps": ["ok", 3]}, "steps[2]"),
    "blank step": (lambda n: {"id": f"bad{n}", "steps": ["ok", " \t"]}, "steps[2]"),
    "long title": (lambda n: {"id": f"bad{n}", "title": "x" * 301, "steps": ["s"]}, "title"),
    "long step": (lambda n: {"id": f"bad{n}", "steps": ["s" * 2001]}, "steps[1]"),
    "too many steps": (lambda n: {"id": f"bad{n}", "steps": ["s"] * (MAX_STEPS + 1)}, "steps"),
    "list id": (lambda n: {"id": [n], "steps": ["s"]}, "id"),
    "escaping id": (lambda n: {"id": f"../bad{n}", "steps": ["s"]}, "id"),
    "not an object": (lambda n: [n, "steps"], None),
    "invalid json": (lambda n: b'{"id": "broken", "steps": [', None),
    "not utf-8": (lambda n: b'{"id": "\xff\xfe", "steps": ["s"]}', None),
    # What the JSON decoder itself does to hostile lines: RecursionError, ValueError past Python's integer
    # digit limit, text that decodes to lone surrogates (no UTF-8 file, folder or S3 key can hold them).
    "deep nesting": (lambda n: b"[" * 100_000 + b"]" * 100_000, None),
    "deep object": (lambda n: b'{"a":' * 50_000 + b"1" + b"}" * 50_000, None),
    "huge number": (lambda n: b'{"id": "h%d", "steps": ["s"], "n": ' % n + b"9" * 5000 + b"}", None),
    "huge id": (lambda n: b'{"id": ' + b"7" * 5000 + b', "steps": ["s"]}', None),
    "surrogate id": (lambda n: b'{"id": "s\\ud800%d", "steps": ["s"]}' % n, "id"),
    "surrogate title": (lambda n: b'{"id": "st%d", "title": "\\udfff", "steps": ["s"]}' % n, "title"),
    "surrogate step": (lambda n: b'{"id": "ss%d", "steps": ["ok", "\\ud83d"]}' % n, "steps[2]"),
    "surrogate key": (lambda n: b'{"id": "sk%d", "steps": ["s"], "\\udc00": 1}' % n, None),
}


@st.composite
def task_files(draw, max_good: int = 4, max_bad: int = 4):
    """(file bytes, good tasks by id, {line: expected field} of the bad records)."""
    goods = draw(st.lists(st.fixed_dictionaries({"id": GOOD_ID, "title": TEXT, "steps": st.lists(STEP, min_size=1,
                                                                                                 max_size=2)}),
                          min_size=1, max_size=max_good))
    bads = draw(st.lists(st.sampled_from(sorted(BAD_KINDS)), max_size=max_bad))
    order = draw(st.permutations([("good", g) for g in goods] + [("bad", b) for b in bads]))
    blank_every = draw(st.integers(0, 3))
    lines, good, bad, ids = [], {}, {}, set()
    for kind, item in order:
        if blank_every and len(lines) % (blank_every + 1) == blank_every:
            lines.append(b"  ")
        number = len(lines) + 1
        if kind == "good":
            lines.append(json.dumps(item, ensure_ascii=draw(st.booleans())).encode())
            if item["id"] in ids:
                bad[number] = "id"  # a duplicate id
            else:
                ids.add(item["id"])
                good[item["id"]] = item
        else:
            make, field = BAD_KINDS[item]
            record = make(number)
            lines.append(record if isinstance(record, bytes) else json.dumps(record).encode())
            bad[number] = field
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + b"\n".join(lines) + b"\n", good, bad


def check_parse(data: bytes, good: dict, bad: dict):
    result = parse_tasks(data, source="tasks.jsonl", max_steps=MAX_STEPS)
    assert {t.id for t in result.tasks} == set(good)
    assert {e.line: e.field for e in result.errors} == bad
    assert all(e.reason for e in result.errors)
    folders = [t.folder for t in result.tasks]
    assert len({f.lower() for f in folders}) == len(folders)
    assert all(f.lower() not in RESERVED_NAMES and f not in (".", "..") and "/" not in f and "\\" not in f
               and len(f) <= 64 for f in folders)
    return result


@settings(max_examples=400, deadline=None)
@given(task_files(max_good=6, max_bad=6))
def test_generated_files_parse_into_good_tasks_and_located_errors(case):
    check_parse(*case)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=task_files(max_good=2, max_bad=3))
def test_generated_files_through_the_real_runner(case, tiny_run):
    data, good, bad = case
    check_parse(data, good, bad)
    profile, cfg, backend = tiny_run
    small = dataclasses.replace(
        cfg, sd=dataclasses.replace(cfg.sd, num_inference_steps=2),
        pool=dataclasses.replace(cfg.pool, iterations=[1], n_first=2, max_candidates=2),
        video=dataclasses.replace(cfg.video, num_frames=2, num_inference_steps=1, decode_chunk_size=2))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tasks = root / "tasks.jsonl"
        tasks.write_bytes(data)
        out = root / "out"
        cwd = os.getcwd()
        summary = runner.run_in_process(str(tasks), str(out), small, progress=False, backend=backend)
        assert os.getcwd() == cwd
        assert sorted(summary.done) == sorted(good) and summary.failed == []
        assert {p for p in files_under(root) if p != "out" and not p.startswith("out/")} == {"tasks.jsonl"}
        for path in out.rglob("*"):
            assert path.resolve().is_relative_to(out.resolve())
        written = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()] if bad else []
        assert {e["line"]: e["field"] for e in written} == bad and all(e["reason"] for e in written)
        for task in parse_tasks(data, source="x", max_steps=MAX_STEPS).tasks:
            manifest = json.loads(Path(runner.task_uri(str(out), task, "manifest.json")).read_text())
            assert manifest["task_id"] == task.id and manifest["title"] == good[task.id]["title"].strip()


@pytest.mark.parametrize("data", [
    b"[" * 200_000,                                                   # a document nested past any stack
    '{"id": "u", "steps": ["s"]}\n{"id": "v", "steps": ["s"]}\n'.encode("utf-16"),  # another encoding
    b'[{"id": "a", "steps": ["s"]}, ' + b"9" * 10_000 + b"]",        # a document with a number past the limit
    b"\x00" * 1000,
])
def test_hostile_whole_files_become_errors_never_exceptions(data):
    result = parse_tasks(data, source="tasks.jsonl", max_steps=MAX_STEPS)
    assert result.errors and all(e.reason for e in result.errors)
    json.dumps([e.to_dict() for e in result.errors], ensure_ascii=False).encode("utf-8")  # each can be written


@pytest.mark.slow
def test_hostile_lines_are_their_lines_errors_through_the_cli(tmp_path, tiny_cache, capsys):
    """Exit 1 (tasks rejected), not 3 before any work: the good task is done, errors.jsonl names each bad line."""
    from cosed.cli import main

    lines = [b'{"id": "ok", "steps": ["Boil water."]}', b"[" * 100_000, b'{"id": "s\\ud800", "steps": ["s"]}',
             b'{"id": "n", "steps": ["s"], "x": ' + b"9" * 5000 + b"}", b'{"id": "k", "steps": ["s"], "\\udc00": 1}']
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code = main(["generate", "--no-ray", "--quiet", "--tasks", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tiny_cache)])
    assert code == 1, capsys.readouterr().err
    assert (tmp_path / "o" / "ok" / "manifest.json").is_file()
    errors = [json.loads(line) for line in (tmp_path / "o" / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4, 5] and all(e["reason"] for e in errors)
