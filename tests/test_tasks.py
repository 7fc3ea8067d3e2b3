import json

import pytest

from cosed.tasks import RESERVED_NAMES, InvalidTask, parse_tasks, task_folder_name

from conftest import SHARED_RECIPES, needs_shared_recipes

GOOD = {"id": "ok", "title": "Toast", "steps": ["Slice the bread.", "Toast it."]}


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def test_valid_jsonl_with_optional_fields():
    record = {**GOOD, "description": "d", "ingredients": ["bread"], "tools": ["toaster"],
              "step_images": ["a.png", "s3://b/k.png"]}
    result = parse_tasks(jsonl(record), source="x", max_steps=12)
    assert result.errors == []
    task = result.tasks[0]
    assert task.steps == ("Slice the bread.", "Toast it.") and task.tools == ("toaster",)


@pytest.mark.parametrize("record, field, words", [
    ({"id": "a", "title": "t"}, "steps", "missing"),
    ({"id": "a", "steps": []}, "steps", "non-empty"),
    ({"id": "a", "steps": ["ok", "  "]}, "steps[2]", "empty"),
    ({"id": "a", "steps": ["ok", 3]}, "steps[2]", "int"),
    ({"id": "a", "steps": ["s"] * 13}, "steps", "maximum of 12"),
    ({"id": "../escape", "steps": ["s"]}, "id", "escape"),
    ({"id": "/etc/passwd", "steps": ["s"]}, "id", "absolute"),
    ({"id": "a/../../b", "steps": ["s"]}, "id", "escape"),
    ({"steps": ["s"]}, "id", "missing"),
    ({"id": "a", "steps": ["s"], "tools": "saw"}, "tools", "list"),
    ({"id": "a", "steps": ["s", "t"], "step_images": ["one.png"]}, "step_images", "2 steps"),
])
def test_each_bad_task_is_reported_with_field_and_reason(record, field, words):
    result = parse_tasks(jsonl(GOOD, record), source="tasks.jsonl", max_steps=12)
    assert [t.id for t in result.tasks] == ["ok"]
    (error,) = result.errors
    assert error.field == field and words in error.reason and error.line == 2


def test_invalid_json_and_non_utf8_lines_are_reported_and_others_kept():
    data = jsonl(GOOD, b'{"id": "x", "steps": [', b'\xff\xfe{"id": "y"}', {**GOOD, "id": "ok2"})
    result = parse_tasks(data, source="t", max_steps=12)
    assert [t.id for t in result.tasks] == ["ok", "ok2"]
    assert [(e.line, e.field) for e in result.errors] == [(2, None), (3, None)]
    assert "invalid JSON" in result.errors[0].reason and "UTF-8" in result.errors[1].reason


def test_duplicate_ids_keep_the_first():
    result = parse_tasks(jsonl(GOOD, {**GOOD, "title": "again"}), source="t", max_steps=12)
    assert [t.title for t in result.tasks] == ["Toast"]
    assert result.errors[0].field == "id" and "duplicate" in result.errors[0].reason


def test_ids_that_differ_only_in_unsafe_characters_case_or_accents_get_their_own_folders():
    ids = ["a b", "a:b", "Soup", "soup", "SOUP", "crème", "creme", "crême", "寿司", "すし", "summary.json",
           "errors.jsonl", "Errors", "x" * 200]
    result = parse_tasks(jsonl(*({**GOOD, "id": i} for i in ids)), source="t", max_steps=12)
    assert result.errors == [] and [t.id for t in result.tasks] == ids
    folders = [t.folder for t in result.tasks]
    assert len({f.lower() for f in folders}) == len(ids)
    assert all(f.lower() not in RESERVED_NAMES and len(f) <= 64 for f in folders)
    assert folders[3] == "soup" and folders[2].startswith("Soup-") and folders[5].startswith("creme-")


def test_a_bom_and_one_bad_record_in_a_json_document_stay_local():
    document = json.dumps([GOOD, {"id": "bad", "steps": "boil"}, {**GOOD, "id": "ok2"}], indent=2).encode()
    result = parse_tasks(b"\xef\xbb\xbf" + document, source="t.json", max_steps=12)
    assert [t.id for t in result.tasks] == ["ok", "ok2"]
    assert [(e.task_id, e.field) for e in result.errors] == [("bad", "steps")]
    recipes = json.dumps({"1": {"title": "a", "steps": ["s"]}, "2": "not a task"}, indent=2).encode()
    result = parse_tasks(recipes, source="r.json", max_steps=12)
    assert [t.id for t in result.tasks] == ["1"] and result.errors[0].task_id == "2"
    broken = document[:-3]
    result = parse_tasks(broken, source="t.json", max_steps=12)
    assert result.tasks == [] and len(result.errors) == 1 and "invalid JSON document" in result.errors[0].reason
    assert [t.id for t in parse_tasks(b"\xef\xbb\xbf" + jsonl(GOOD), source="t", max_steps=12).tasks] == ["ok"]


@pytest.mark.parametrize("record, field", [
    ({"id": "a", "title": "t" * 301, "steps": ["s"]}, "title"),
    ({"id": "a", "steps": ["s", "w" * 2001]}, "steps[2]"),
    ({"id": "i" * 257, "steps": ["s"]}, "id"),
])
def test_length_limits_name_the_field(record, field):
    (error,) = parse_tasks(jsonl(record), source="t", max_steps=12).errors
    assert error.field == field and "more than" in error.reason


def test_recipes_json_layout_uses_keys_as_ids():
    data = json.dumps({"17": {"title": "Soup", "steps": ["Boil.", "Serve."], "steps_generated": ["x", "y"]},
                       "18": {"title": "Bad", "steps": "boil"}}).encode()
    result = parse_tasks(data, source="r.json", max_steps=12)
    assert [t.id for t in result.tasks] == ["17"]
    assert result.errors[0].task_id == "18" and result.errors[0].field == "steps"


def test_folder_names_are_sanitised():
    assert task_folder_name("pasta-1") == "pasta-1"
    assert task_folder_name("Pasta al pomodoro #1").startswith("Pasta_al_pomodoro_1-")
    with pytest.raises(InvalidTask):
        task_folder_name("..")


@needs_shared_recipes()
def test_every_shared_recipe_parses():
    result = parse_tasks((SHARED_RECIPES / "dataset.json").read_bytes(), source="dataset.json", max_steps=12)
    assert len(result.tasks) == 1382 and result.errors == []
    assert all(2 <= len(t.steps) <= 6 for t in result.tasks)
