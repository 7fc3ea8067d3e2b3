import json

import pytest

from cosed.tasks import InvalidTask, parse_tasks, task_folder_name

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


def test_ids_that_differ_only_in_unsafe_characters_collide_as_folders():
    result = parse_tasks(jsonl({**GOOD, "id": "a b"}, {**GOOD, "id": "a:b"}), source="t", max_steps=12)
    assert len(result.tasks) == 1 and "duplicate" in result.errors[0].reason


def test_recipes_json_layout_uses_keys_as_ids():
    data = json.dumps({"17": {"title": "Soup", "steps": ["Boil.", "Serve."], "steps_generated": ["x", "y"]},
                       "18": {"title": "Bad", "steps": "boil"}}).encode()
    result = parse_tasks(data, source="r.json", max_steps=12)
    assert [t.id for t in result.tasks] == ["17"]
    assert result.errors[0].task_id == "18" and result.errors[0].field == "steps"


def test_folder_names_are_sanitised():
    assert task_folder_name("Pasta al pomodoro #1") == "Pasta_al_pomodoro_1"
    with pytest.raises(InvalidTask):
        task_folder_name("..")


@needs_shared_recipes()
def test_every_shared_recipe_parses():
    result = parse_tasks((SHARED_RECIPES / "dataset.json").read_bytes(), source="dataset.json", max_steps=12)
    assert len(result.tasks) == 1382 and result.errors == []
    assert all(2 <= len(t.steps) <= 6 for t in result.tasks)
