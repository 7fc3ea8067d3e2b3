"""The command line as a newcomer meets it: no silent random weights, help that fits each command, task files
converted from the layouts people have."""

import json
import re
from pathlib import Path

import pytest

from cosed.cli import build_parser, main
from cosed.convert import convert, read

from conftest import REPO, SHARED_RECIPES, local_ray, needs_shared_recipes

README = REPO / "README.md"


def example_task_line() -> str:
    """The README's example task (its first ```jsonl block)."""
    (block,) = re.findall(r"```jsonl\n(.*?)```", README.read_text(encoding="utf-8"), re.S)[:1]
    return block.strip()


@pytest.mark.slow
def test_generate_with_gpus_and_no_profile_stops_and_tiny_says_random_weights(tmp_path, tiny_cache, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(example_task_line() + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with local_ray(num_gpus=2):
        assert main(["generate", "--tasks", str(tasks), "--out", str(out), "--cache-dir", str(tiny_cache)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "2 GPU(s)" in err[0] and "--profile sd21-svd or flux-ltx" in err[0]
        assert not out.exists()
        assert main(["generate", "--tasks", str(tasks), "--out", str(out), "--profile", "tiny",
                     "--cache-dir", str(tiny_cache), "--quiet"]) == 0
    printed = capsys.readouterr()
    said = [line for line in (printed.out + printed.err).splitlines() if "RANDOM WEIGHTS" in line]
    assert said and printed.out.strip().splitlines()[-1].startswith("note: RANDOM WEIGHTS")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_weights"] is True and summary["done"] == 1


@pytest.mark.parametrize("verb", [["profiles"], ["models", "fetch"], ["doctor"]])
def test_setup_commands_take_only_the_flags_they_use(verb, capsys):
    for flag in (["--seed", "1"], ["--selector", "s.safetensors"], ["--overwrite"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(verb + flag)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_parser().parse_args(verb + ["--help"])
    text = capsys.readouterr().out
    assert "--seed" not in text and "--overwrite" not in text


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-selector", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10)" in text and "(default: 0.01)" in text and "{identity,template,given,lm}" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "required where GPUs are present" in " ".join(capsys.readouterr().out.split())


@needs_shared_recipes()
def test_convert_round_trips_the_shared_recipes(tmp_path):
    source = str(SHARED_RECIPES / "dataset.json")
    original = read(source, 1000)
    assert len(original.tasks) == 1382 and not original.errors
    convert(source, str(tmp_path / "tasks.jsonl"))
    convert(str(tmp_path / "tasks.jsonl"), str(tmp_path / "again.json"))
    convert(str(tmp_path / "again.json"), str(tmp_path / "steps.csv"))
    for copy in ("tasks.jsonl", "again.json", "steps.csv"):
        assert read(str(tmp_path / copy), 1000).tasks == original.tasks, copy


def test_convert_a_csv_of_steps_and_report_its_bad_rows(tmp_path, capsys):
    csv = tmp_path / "steps.csv"
    csv.write_text("id,title,step\ntea,Tea,Boil water.\ntea,Tea,Steep the leaves.\nbad,Bad,\n"
                   "toast,Toast,Slice the bread.\n", encoding="utf-8")
    assert main(["tasks", "convert", str(csv), str(tmp_path / "tasks.jsonl")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("2 tasks (3 steps) written") and "'bad' (line 4), field 'steps[1]'" in out
    lines = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert lines == [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]},
                     {"id": "toast", "title": "Toast", "steps": ["Slice the bread."]}]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tasks", "convert", str(csv)])
    assert main(["tasks", "convert", str(csv), str(tmp_path / "tasks.txt")]) == 2


def test_the_readme_starts_short_and_every_page_it_links_exists():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220
    linked = set(re.findall(r"\]\(((?:docs|cluster)/[^)#]+|LICENSE)\)", "\n".join(lines)))
    assert {"docs/cli.md", "docs/failure-model.md", "cluster/README.md", "LICENSE"} <= linked
    assert all((REPO / path).is_file() for path in linked), linked
    cluster = (REPO / "cluster" / "README.md").read_text(encoding="utf-8").splitlines()
    starts = [n for n, line in enumerate(cluster, 1) if line.startswith(("**Local", "**Path 1", "**Path 2", "**Path 3"))]
    assert len(starts) == 4 and max(starts) <= 100  # a copy-paste start per cluster path, at the top
