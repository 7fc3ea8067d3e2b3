"""Tasks that carry their own captions, and the ``given`` rewriter that uses them."""

import json

import pytest

from cosed.cli import main
from cosed.rewrite import GivenRewriter, default_rewriter, make_rewriter
from cosed.tasks import parse_tasks

from conftest import SHARED_RECIPES, needs_shared_recipes, write_jsonl

JSONL = [
    {"id": "a", "title": "Soup", "steps": ["Chop.", "Boil."], "captions": ["carrots on a board", "a pot of soup"]},
    {"id": "b", "title": "Tea", "steps": ["Boil water."]},
]


def test_jsonl_captions_reach_the_task_and_the_given_rewriter():
    tasks = parse_tasks("".join(json.dumps(r) + "\n" for r in JSONL).encode(), source="t.jsonl", max_steps=12).tasks
    assert tasks[0].captions == ("carrots on a board", "a pot of soup") and tasks[1].captions == ()
    assert GivenRewriter().captions(tasks[0]) == ["carrots on a board", "a pot of soup"]
    with pytest.raises(ValueError, match="task 'b' carries no captions"):
        make_rewriter("given").captions(tasks[1])
    assert default_rewriter(tasks) == "template" and default_rewriter(tasks[:1]) == "given"


def test_recipes_layout_steps_generated_are_the_captions():
    document = {"7": {"title": "Toast", "steps": ["Slice.", "Toast."], "steps_generated": ["a loaf", "golden toast"]},
                "8": {"title": "Jam", "steps": ["Spread."]}}
    tasks = parse_tasks(json.dumps(document).encode(), source="d.json", max_steps=12).tasks
    assert GivenRewriter().captions(tasks[0]) == ["a loaf", "golden toast"] and tasks[1].captions == ()


@pytest.mark.parametrize("captions, field, reason", [
    (["one"], "captions", "1 captions for 2 steps"),
    (["one", 2], "captions[2]", "not a string"),
    (["one", "  "], "captions[2]", "empty"),
    ("one, two", "captions", "must be a list"),
])
def test_bad_captions_reject_the_task_naming_the_field(captions, field, reason):
    record = {"id": "x", "steps": ["A.", "B."], "captions": captions}
    result = parse_tasks((json.dumps(record) + "\n").encode(), source="t.jsonl", max_steps=12)
    assert not result.tasks and result.errors[0].field == field and reason in result.errors[0].reason


def test_given_rewriter_on_tasks_without_captions_stops_before_any_work(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", JSONL)
    assert main(["evaluate", "--tasks", str(tasks), "--out", str(tmp_path / "run"), "--no-ray", "--quiet",
                 "--rewriter", "given"]) == 2
    assert "1 task(s) carry no captions (e.g. b)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@needs_shared_recipes()
def test_the_shared_recipes_carry_the_authors_captions_so_given_is_the_default():
    tasks = parse_tasks((SHARED_RECIPES / "dataset.json").read_bytes(), source="dataset.json", max_steps=64).tasks
    assert len(tasks) > 1000 and default_rewriter(tasks) == "given"
    assert GivenRewriter().captions(tasks[0])[0].startswith("a pan with coconut oil")
