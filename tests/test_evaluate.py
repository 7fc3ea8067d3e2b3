"""Training, evaluation and the report through the CLI, in-process on the tiny profile."""

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from cosed.cli import main
from cosed.evaluate import bootstrap_mean, source_distance
from cosed.selector import ContrastiveSelector

from conftest import SHARED_RECIPES, SMALL_TASKS, needs_shared_recipes, write_jsonl

pytestmark = pytest.mark.slow

TASKS = SMALL_TASKS
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, tiny_cache):
    folder = tmp_path_factory.mktemp("eval")
    tasks = write_jsonl(folder / "tasks.jsonl", TASKS)
    code = main(["evaluate", "--tasks", str(tasks), "--out", str(folder / "run"), "--no-ray", "--quiet",
                 "--cache-dir", str(tiny_cache)])
    assert code == 0
    return folder / "run"


def test_evaluate_writes_rows_for_every_method(evaluation):
    rows = list(csv.DictReader((evaluation / "metrics.csv").open()))
    assert sorted({(r["method"], r["task_id"]) for r in rows}) == sorted(
        (m, t["id"]) for m in ("independent", "chain", "cosed") for t in TASKS)
    independent = [r for r in rows if r["method"] == "independent"]
    assert all(set(r["source_distances"].split()) <= {"fresh"} for r in independent)
    chain = [r for r in rows if r["method"] == "chain"]
    assert all(set(r["source_distances"].split()) <= {"1", "fresh"} for r in chain)
    summary = json.loads((evaluation / "summary.json").read_text())
    for method in ("independent", "chain", "cosed"):
        stat = summary[method]["clip_t"]
        assert stat["low"] <= stat["mean"] <= stat["high"] and stat["n"] == 3
    assert [(r["method"], r["variant"]) for r in summary["ablation"]] == [
        (m, "untrained") for m in ("independent", "chain", "cosed")]
    for plot in ("clip_i_vs_clip_t.png", "source_distance.png"):
        assert Image.open(evaluation / "plots" / plot).size[0] > 300


def test_report_links_every_scene_and_says_the_weights_are_random(evaluation):
    page = (evaluation / "report.html").read_text()
    assert "Random-weight models" in page and "tiny" in page
    for task in TASKS:
        for n in range(1, len(task["steps"]) + 1):
            assert f'cosed/{task["id"]}/scenes/step_{n:02d}.png' in page
            assert (evaluation / "cosed" / task["id"] / "scenes" / f"step_{n:02d}.png").is_file()
        assert f'cosed/{task["id"]}/video.mp4' in page
    manifest = json.loads((evaluation / "cosed" / "sauce" / "manifest.json").read_text())
    thumb = manifest["steps"][2]["candidates"][0]["image"]
    assert (evaluation / "cosed" / "sauce" / thumb).is_file() and thumb in page
    assert page.count("marker-end") == sum(
        1 for t in TASKS for s in json.loads((evaluation / "cosed" / t["id"] / "manifest.json").read_text())["steps"][1:]
        if source_distance(s) != "fresh")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs it)")
def test_report_renders_in_a_real_browser(evaluation, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
                    "--hide-scrollbars", "--window-size=1300,1100", f"--screenshot={shot}",
                    (evaluation / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1100, 1300)
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
    assert saturated[500:].mean() > 0.02, "no colourful scene images below the overview: the storyboard did not render"


def test_train_selector_cli_writes_checkpoint_report_and_split(tmp_path, tiny_cache, capsys):
    records = [{"id": f"t{i}", "title": f"Dish {i % 8}", "steps": [f"Prepare part {i}.", f"Cook part {i}.",
                                                                   f"Serve dish {i}."]} for i in range(12)]
    tasks = write_jsonl(tmp_path / "t.jsonl", records)
    assert main(["train-selector", "--tasks", str(tasks), "--out", str(tmp_path / "sel"), "--generate-missing",
                 "--no-ray", "--quiet", "--epochs", "3", "--holdout", "0.25", "--temperature", "0.5",
                 "--cache-dir", str(tiny_cache)]) == 0
    report = json.loads((tmp_path / "sel" / "selector.json").read_text())
    assert report["parameters"] == 524_288 and len(report["loss_per_epoch"]) == 3
    assert set(report["held_out"]) == {"trained", "untrained", "clip"} and report["random_weights"] is True
    assert report["rewriter"] == "template"
    split = json.loads((tmp_path / "sel" / "split.json").read_text())
    assert sorted(split["train"] + split["held_out"]) == sorted(r["id"] for r in records)
    assert report["held_out_tasks"] == len(split["held_out"]) >= 2
    titles = {r["id"]: r["title"] for r in records}
    assert not {titles[i] for i in split["train"]} & {titles[i] for i in split["held_out"]}
    assert ContrastiveSelector.load(tmp_path / "sel" / "selector.safetensors").temperature == 0.5
    checkpoint = str(tmp_path / "sel" / "selector.safetensors")
    capsys.readouterr()
    assert main(["evaluate", "--tasks", str(tasks), "--out", str(tmp_path / "ev"), "--no-ray", "--quiet",
                 "--selector", checkpoint, "--refuse-trained-tasks"]) == 2
    captured = capsys.readouterr()
    assert f"warning: the selector was trained on {len(split['train'])} of these 12 tasks" in captured.out
    assert "--refuse-trained-tasks" in captured.err and not (tmp_path / "ev").exists()
    one = write_jsonl(tmp_path / "one.jsonl", [r for r in records if r["id"] == split["train"][0]])
    assert main(["evaluate", "--tasks", str(one), "--out", str(tmp_path / "ev1"), "--no-ray", "--quiet",
                 "--methods", "independent", "--cache-dir", str(tiny_cache), "--selector", checkpoint]) == 0
    assert "warning: the selector was trained on 1 of these 1 tasks" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "ev1" / "independent" / split["train"][0] / "manifest.json").read_text())
    assert manifest["config"]["selector"].endswith("selector.safetensors")


def test_train_selector_without_images_asks_for_generate_missing(tmp_path, tiny_cache, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    assert main(["train-selector", "--tasks", str(tasks), "--out", str(tmp_path / "sel"), "--no-ray", "--quiet",
                 "--cache-dir", str(tiny_cache)]) == 2
    assert "--generate-missing" in capsys.readouterr().err


def test_train_selector_reads_step_images(tmp_path, tiny_cache):
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        paths = []
        for n in range(2):
            path = tmp_path / f"img{i}_{n}.png"
            Image.fromarray(rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        records.append({"id": f"r{i}", "title": "Craft", "steps": ["Cut.", "Glue."], "step_images": paths})
    tasks = write_jsonl(tmp_path / "t.jsonl", records)
    assert main(["train-selector", "--tasks", str(tasks), "--out", str(tmp_path / "sel"), "--no-ray", "--quiet",
                 "--epochs", "2", "--cache-dir", str(tiny_cache)]) == 0
    assert json.loads((tmp_path / "sel" / "selector.json").read_text())["images"] == "step_images"


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    first = bootstrap_mean(values, seed=3)
    assert first == bootstrap_mean(values, seed=3)
    assert first["low"] < first["mean"] == 4.0 < first["high"]
    assert bootstrap_mean([None, None])["mean"] is None


def test_eval_captions_scores_each_rewriter(tmp_path, tiny_cache, capsys):
    pairs = [{"instruction": "Give me the image caption for this recipe.",
              "input": "Step 1: A pot of water on a stove.\nStep 2: Add the pasta.",
              "output": "Pasta being added to a pot of boiling water on a stove."},
             {"instruction": "Give me the image caption for this recipe.",
              "input": "Step 1: Pasta in a pot.\nStep 2: Drain it.", "output": "Pasta drained in a colander."}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    assert main(["eval-captions", "--pairs", str(path), "--rewriters", "identity,template,lm",
                 "--rewriter-model", "tiny:captioner", "--out", str(tmp_path / "scores.json"),
                 "--cache-dir", str(tiny_cache)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert set(scores) == {"identity", "template", "lm"}
    assert all(0 <= s["bleu"] <= 100 and s["pairs"] == 2 for s in scores.values())
    assert scores["template"]["chrf"] != scores["identity"]["chrf"]


@needs_shared_recipes()
def test_eval_captions_on_the_shared_pairs(tmp_path, tiny_cache):
    assert main(["eval-captions", "--pairs", str(SHARED_RECIPES / "captions_eval.json"), "--limit", "40",
                 "--out", str(tmp_path / "s.json"), "--cache-dir", str(tiny_cache)]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert scores["identity"]["pairs"] == 40 and scores["template"]["bleu"] > 0


def test_ablation_runs_each_method_under_each_selector_variant(tmp_path, tiny_cache):
    tasks = write_jsonl(tmp_path / "t.jsonl", [TASKS[1], TASKS[2]])
    run = tmp_path / "run"
    assert main(["evaluate", "--tasks", str(tasks), "--out", str(run), "--no-ray", "--quiet", "--cache-dir",
                 str(tiny_cache), "--methods", "independent,cosed", "--variants", "untrained,clip,text"]) == 0
    table = list(csv.DictReader((run / "ablation.csv").open()))
    assert [(r["method"], r["variant"]) for r in table] == [
        ("independent", "n/a"), ("cosed", "untrained"), ("cosed", "clip"), ("cosed", "text")]
    summary = json.loads((run / "summary.json").read_text())
    rows = {(r["method"], r["variant"]): r for r in summary["ablation"]}
    assert rows[("independent", "n/a")]["fresh_share"] == 1.0 and rows[("independent", "n/a")]["mean_steps_back"] is None
    for row in summary["ablation"]:
        assert row["tasks"] == 2 and row["clip_t"]["low"] <= row["clip_t"]["mean"] <= row["clip_t"]["high"]
    # Text-only scores cannot tell candidates that share a caption apart: the first (step 1, iteration 1) is kept,
    # so the shelf's step 3 reaches two steps back.
    text = json.loads((run / "cosed-text" / "shelf" / "manifest.json").read_text())
    assert [s["chosen"] for s in text["steps"][1:]] == [0, 0] and text["config"]["selector_mode"] == "text"
    assert rows[("cosed", "text")]["max_steps_back"] == 2
    clip = json.loads((run / "cosed-clip" / "shelf" / "manifest.json").read_text())
    assert clip["config"]["selector_mode"] == "clip"
    assert "| cosed | clip | 2 |" in (run / "ablation.md").read_text()
    page = (run / "report.html").read_text()
    assert "Ablation: method × selector" in page and page.count("<td>cosed</td><td>") >= 3
    assert main(["evaluate", "--tasks", str(tasks), "--out", str(tmp_path / "x"), "--no-ray", "--quiet",
                 "--variants", "trained"]) == 2
