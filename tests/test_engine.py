"""End to end on the tiny profile: real diffusers / open_clip models, real mp4 files."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cosed import determinism, runner
from cosed.cli import main
from cosed.engine import manifest_without_timings
from cosed.rewrite import make_rewriter
from cosed.video import decode_mp4

from conftest import outputs, write_jsonl

pytestmark = pytest.mark.slow

TASKS = [
    {"id": "sauce", "title": "Tomato sauce", "steps": ["Dice the onion on the board.", "Fry the onion in oil.",
                                                        "Chop tomatoes on the board.", "Simmer everything."]},
    {"id": "shelf", "title": "Shelf", "steps": ["Cut the board.", "Sand the edges.", "Screw it to the wall."]},
    {"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]},
]
BAD = [{"id": "broken", "title": "No steps"}, {"id": "../../etc", "steps": ["x"]}]


def run(tmp_path: Path, name: str, records, tiny_run, **kwargs):
    _, cfg, backend = tiny_run
    tasks = write_jsonl(tmp_path / f"{name}.jsonl", records)
    out = tmp_path / name
    summary = runner.run_in_process(str(tasks), str(out), cfg, progress=False, backend=backend, **kwargs)
    return out, summary


def manifests(out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/manifest.json"))}


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_run):
    return run(tmp_path_factory.mktemp("first"), "out", TASKS[:2] + BAD + TASKS[2:], tiny_run)


def test_every_valid_task_follows_the_output_contract(first, tiny_run):
    out, summary = first
    _, cfg, _ = tiny_run
    assert sorted(summary.done) == ["sauce", "shelf", "tea"] and len(summary.rejected) == 2
    for task in TASKS:
        folder = out / task["id"]
        manifest = json.loads((folder / "manifest.json").read_text())
        n = len(task["steps"])
        assert manifest["task_id"] == task["id"] and manifest["profile"] == "tiny" and manifest["random_weights"]
        assert [s["step"] for s in manifest["steps"]] == list(range(1, n + 1))
        frames = decode_mp4((folder / "video.mp4").read_bytes())
        assert frames.shape == (n * cfg.video.num_frames, cfg.video.height, cfg.video.width, 3)
        assert manifest["video_frames"] == len(frames)
        for step in manifest["steps"]:
            image = Image.open(folder / step["image"])
            assert image.size == (cfg.sd.width, cfg.sd.height)
            assert len(decode_mp4((folder / step["clip"]).read_bytes())) == cfg.video.num_frames
            assert 0 <= step["chosen"] < len(step["candidates"])
        assert Image.open(folder / "storyboard.png").size[0] > 0
        assert manifest["determinism"] == determinism.record(cfg.cpu_threads)
        assert [s["scene_sha256"] for s in manifest["steps"]] == [
            hashlib.sha256((folder / s["image"]).read_bytes()).hexdigest() for s in manifest["steps"]]
        assert set(manifest["metrics"]) == {"clip_i", "clip_t", "boundary_mad"}
        assert all(isinstance(v, float) for v in manifest["metrics"].values())


def test_candidate_counts_and_non_linear_pool_sources(first, tiny_run):
    out, _ = first
    _, cfg, _ = tiny_run
    w, f = len(cfg.pool.iterations), cfg.pool.fresh
    steps = manifests(out)["sauce"]["steps"]
    assert len(steps[0]["candidates"]) == cfg.pool.n_first
    for i, step in enumerate(steps[1:], start=2):
        assert cfg.pool.max_candidates is None  # no cap by default, as in the paper
        assert len(step["candidates"]) == (i - 1) * w + f
        pooled = {c["source"]["step"] for c in step["candidates"] if c["source"]["kind"] == "pool"}
        assert pooled == set(range(1, i))
    assert any(c["source"]["step"] < 2 for c in steps[2]["candidates"] if c["source"]["kind"] == "pool")


def test_rejected_tasks_are_listed_and_the_others_finish(first):
    out, _ = first
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["task_id"], e["line"], e["field"]) for e in errors] == [("broken", 3, "steps"), ("../../etc", 4, "id")]
    assert not (out.parent / "etc").exists()


def test_same_inputs_give_same_manifests_and_png_bytes(first, tmp_path, tiny_run):
    out, _ = first
    again, _ = run(tmp_path, "again", TASKS, tiny_run)
    a, b = manifests(out), manifests(again)
    assert a.keys() == b.keys()
    for key in a:
        assert manifest_without_timings(a[key]) == manifest_without_timings(b[key])
        assert a[key]["timings"]
    for png in out.glob("*/scenes/*.png"):
        assert png.read_bytes() == (again / png.relative_to(out)).read_bytes()


def test_a_task_alone_gives_the_same_result_as_among_others(first, tmp_path, tiny_run):
    out, _ = first
    alone, _ = run(tmp_path, "alone", [TASKS[1]], tiny_run)
    assert manifest_without_timings(manifests(alone)["shelf"]) == manifest_without_timings(manifests(out)["shelf"])


def test_a_different_seed_changes_the_draws(first, tmp_path, tiny_run):
    import dataclasses

    profile, cfg, backend = tiny_run
    other = dataclasses.replace(cfg, seed=1)
    tasks = write_jsonl(tmp_path / "t.jsonl", [TASKS[2]])
    runner.run_in_process(str(tasks), str(tmp_path / "s1"), other, progress=False, backend=backend)
    changed = manifests(tmp_path / "s1")["tea"]["steps"][0]["candidates"][0]["source"]["seed"]
    assert changed != manifests(first[0])["tea"]["steps"][0]["candidates"][0]["source"]["seed"]


def test_resume_skips_done_tasks_and_redoes_missing_ones(tmp_path, tiny_run):
    out, summary = run(tmp_path, "resume", TASKS[1:], tiny_run)
    assert sorted(summary.done) == ["shelf", "tea"]
    (out / "tea" / "manifest.json").unlink()
    _, second = run(tmp_path, "resume", TASKS[1:], tiny_run)
    assert second.done == ["tea"] and second.skipped == ["shelf"]
    _, forced = run(tmp_path, "resume", TASKS[1:], tiny_run, overwrite=True)
    assert sorted(forced.done) == ["shelf", "tea"]


BENCH = {"id": "bench", "title": "Bench", "steps": ["Cut the boards.", "Sand the edges.", "Drill the holes.",
                                                   "Screw the legs on.", "Oil the wood."]}


class DiesAtStep:
    """The tiny backend, counting text-to-image renders per caption; with ``die_at``, the first render of the
    ``die_at``-th caption raises (the process sequencing the task goes away mid-step)."""

    def __init__(self, backend, die_at: int | None = None):
        self.backend, self.die_at = backend, die_at
        self.captions: list[str] = []
        self.renders: Counter = Counter()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def render(self, requests):
        for request in requests:
            if request.caption not in self.captions:
                self.captions.append(request.caption)
            if len(self.captions) == self.die_at:
                raise RuntimeError("the driver died")
            self.renders[request.caption] += 1
        return self.backend.render(requests)


def test_a_retry_resumes_at_its_last_chosen_step_and_gives_the_same_bytes(tmp_path, tiny_run, clean_outputs):
    _, cfg, backend = tiny_run
    tasks, out = str(write_jsonl(tmp_path / "t.jsonl", [BENCH])), str(tmp_path / "out")
    first = DiesAtStep(backend, die_at=3)
    summary = runner.run_in_process(tasks, out, cfg, progress=False, backend=first)
    assert [e.task_id for e in summary.failed] == ["bench"] and len(first.captions) == 3
    assert sorted(p.name for p in (tmp_path / "out").glob(".cosed-parts/bench/*/step_*.json")) == \
        ["step_01.json", "step_02.json"]
    retry = DiesAtStep(backend)
    assert runner.run_in_process(tasks, out, cfg, progress=False, backend=retry).done == ["bench"]
    assert len(retry.captions) == 3 and retry.captions[0] == first.captions[2]  # steps 3-5 only, from step 3
    assert [retry.renders[caption] for caption in first.captions[:2]] == [0, 0]  # no SD call for steps 1-2
    assert outputs(tmp_path / "out", [BENCH]) == clean_outputs("tiny", [BENCH])  # every byte of every file


def test_a_task_that_fails_at_run_time_is_reported_and_the_rest_finish(tmp_path, tiny_run, monkeypatch):
    real = runner.generate_task

    def flaky(task, *args, **kwargs):
        if task.id == "shelf":
            raise RuntimeError("GPU fell off the bus")
        return real(task, *args, **kwargs)

    monkeypatch.setattr(runner, "generate_task", flaky)
    out, summary = run(tmp_path, "flaky", TASKS[1:], tiny_run)
    assert summary.done == ["tea"] and [e.task_id for e in summary.failed] == ["shelf"]
    error = json.loads((out / "errors.jsonl").read_text())
    assert error["task_id"] == "shelf" and "GPU fell off the bus" in error["reason"]
    assert not (out / "shelf" / "manifest.json").exists()


def test_lm_rewriter_runs_a_local_model_and_caches(tiny_cache, tmp_path):
    from cosed.tasks import Task

    rewriter = make_rewriter("lm", model="tiny:captioner", cache_dir=tiny_cache, cache_root=str(tmp_path / "captions"))
    task = Task(id="t", title="Tea", steps=("Boil water.", "Steep the leaves."))
    captions = rewriter.captions(task)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert len(list((tmp_path / "captions").glob("*.txt"))) == 2
    again = make_rewriter("lm", model="tiny:captioner", cache_dir=tiny_cache, cache_root=str(tmp_path / "captions"))
    assert again.captions(task) == captions and again.captioner.generate_calls == 0


def test_cli_reports_missing_tasks_file_and_offline_hub_clearly(tmp_path, capsys, monkeypatch, tiny_cache):
    assert main(["generate", "--tasks", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                 "--cache-dir", str(tiny_cache), "--no-ray"]) == 2
    assert "task file not found" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = write_jsonl(tmp_path / "t.jsonl", [TASKS[2]])
    assert main(["generate", "--tasks", str(tasks), "--out", str(tmp_path / "o"), "--profile", "sd21-svd", "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "could not load" in err and "--profile tiny" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "tea").exists()


def test_cli_demo_writes_every_example(tmp_path, capsys, tiny_cache):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--cache-dir", str(tiny_cache), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "4 done" in printed and str(tmp_path / "demo") in printed
    for folder in ("pancakes", "bookshelf", "tomato-sauce", "herb-planter"):
        manifest = json.loads((tmp_path / "demo" / folder / "manifest.json").read_text())
        assert len(decode_mp4((tmp_path / "demo" / folder / "video.mp4").read_bytes())) == \
            len(manifest["steps"]) * manifest["config"]["video"]["num_frames"]
