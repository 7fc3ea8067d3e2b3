"""The measures evaluate adds after generation: boundary continuity in CLIP space, and CLIP-I to the user's scene
image beside the same run without it.

With the tiny twins' random weights these numbers check the plumbing (which frames and images are embedded,
against what, and where the numbers land), not whether transitions look natural or the user's setting carries.
"""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from cosed.calls import EmbedImages
from cosed.cli import main
from cosed.continuity import boundaries, clip_distance
from cosed.evaluate import (EvalRun, continuity_rows, scene_image_baselines, scene_image_rows,
                            without_scene_images)
from cosed.images import png_bytes, png_image
from cosed.measures import ClipMeasures
from cosed.metrics import clip_i_to
from cosed.scene_image import load
from cosed.tasks import parse_tasks
from cosed.video import encode_mp4

from conftest import write_jsonl


def by_colour(vectors: dict[int, list[float]]):
    """A stand-in CLIP: each frame's embedding is looked up by its (uniform) colour, the math left to the code."""
    return lambda images: np.asarray([vectors[int(np.asarray(im)[0, 0, 0])] for im in images], dtype=np.float64)


def flat(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


def test_boundary_clip_is_zero_for_identical_frames_and_the_mean_cosine_distance_otherwise():
    embed = by_colour({10: [1.0, 0.0], 20: [0.0, 3.0], 30: [2.0, 2.0], 40: [5.0, 0.0]})
    assert clip_distance([(flat(10), flat(10)), (flat(30), flat(30))], embed) == pytest.approx(0.0, abs=1e-12)
    assert clip_distance([(flat(10), flat(40))], embed) == pytest.approx(0.0, abs=1e-12)  # norms do not count
    # boundary 1: orthogonal (100); boundary 2: 45 degrees (100 (1 - 1/sqrt 2)); averaged over boundaries
    expected = (100.0 + 100.0 * (1 - 1 / math.sqrt(2))) / 2
    assert clip_distance([(flat(10), flat(20)), (flat(40), flat(30))], embed) == pytest.approx(expected)
    assert clip_distance([], embed) is None


def test_the_tasks_without_their_scene_images_keep_every_other_field_and_the_fingerprint_of_a_task_without_one(
        tmp_path, tiny_run):
    from cosed.engine import task_fingerprint

    profile, cfg, _ = tiny_run
    Image.fromarray(flat(90)).save(tmp_path / "me.png")
    records = [{"id": "bike", "title": "Bike", "steps": ["Flip it.", "Remove the wheel."], "tools": ["spanner"],
                "captions": ["a bike", "a wheel"], "scene_image": str(tmp_path / "me.png")},
               {"id": "tea", "steps": ["Boil water."]}]
    tasks = parse_tasks("".join(json.dumps(r) + "\n" for r in records).encode(), source="t", max_steps=12).tasks
    dropped = parse_tasks(without_scene_images(tasks).encode(), source="b", max_steps=12)
    assert not dropped.errors and [t.id for t in dropped.tasks] == ["bike"]  # only the tasks that had an image
    plain = {k: v for k, v in records[0].items() if k != "scene_image"}
    written_without = parse_tasks((json.dumps(plain) + "\n").encode(), source="p", max_steps=12).tasks[0]
    assert dropped.tasks[0] == written_without and dropped.tasks[0].scene_image == ""
    assert task_fingerprint(dropped.tasks[0], profile, cfg) == task_fingerprint(written_without, profile, cfg)
    assert task_fingerprint(dropped.tasks[0], profile, cfg) != task_fingerprint(tasks[0], profile, cfg)
    assert [(r.name, r.method, r.baseline_of) for r in scene_image_baselines([EvalRun("cosed", "cosed", "x")])] == [
        ("cosed-no-scene-image", "cosed", "cosed")]


def stored_task(root, run, task_id, steps, scene_image=None):
    """A finished task folder as the writer leaves it: scene PNGs, clips, manifest."""
    folder = root / run / task_id
    (folder / "scenes").mkdir(parents=True)
    (folder / "clips").mkdir()
    meta = []
    for n, (scene, clip) in enumerate(steps, start=1):
        (folder / f"scenes/step_{n:02d}.png").write_bytes(png_bytes(flat(scene)))
        (folder / f"clips/step_{n:02d}.mp4").write_bytes(encode_mp4(np.stack([flat(v) for v in clip]), 7))
        meta.append({"step": n, "image": f"scenes/step_{n:02d}.png", "clip": f"clips/step_{n:02d}.mp4"})
    manifest = {"task_id": task_id, "steps": meta}
    if scene_image is not None:
        (folder / "scenes/step_00.png").write_bytes(png_bytes(flat(scene_image)))
        manifest["scene_image"] = {"image": "scenes/step_00.png"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_run_without_the_image_is_measured_against_the_image_the_run_with_it_stored(tmp_path):
    """Colours survive the lossy clip encoding within a few levels: the stand-in CLIP buckets them by tens."""
    vectors = {0: [1.0, 0.0], 10: [0.0, 1.0], 20: [1.0, 1.0], 30: [3.0, 1.0], 100: [1.0, 2.0]}
    embed = by_colour(vectors)
    bucketed = lambda images: embed([np.full((2, 2, 3), round(int(np.asarray(im)[0, 0, 0]) / 10) * 10)  # noqa: E731
                                     for im in images])
    stored_task(tmp_path, "cosed", "bike", [(20, [0, 10]), (30, [20, 30])], scene_image=100)
    without = stored_task(tmp_path, "cosed-no-scene-image", "bike", [(0, [0, 10]), (10, [30, 20])])
    measure = ClipMeasures(str(tmp_path), bucketed, {"cosed-no-scene-image": "cosed"})
    got = measure("cosed-no-scene-image", without)
    expected = clip_i_to(np.asarray([vectors[0], vectors[10]]), np.asarray(vectors[100]))
    assert got["clip_i_scene_image"] == pytest.approx(expected)
    assert got["boundary_clip"] == pytest.approx(100 * (1 - 1 / math.sqrt(10)))  # clip 1 ends on 10, clip 2 starts on 30
    assert measure("cosed", json.loads((tmp_path / "cosed/bike/manifest.json").read_text())) == {
        "boundary_clip": pytest.approx(100 * (1 - 1 / math.sqrt(2)))}  # 10 -> 20; the run with it has its own number
    lone = stored_task(tmp_path, "cosed-no-scene-image", "tea", [(0, [0, 0])])
    assert measure("cosed-no-scene-image", lone) == {"boundary_clip": None, "clip_i_scene_image": None}


def test_continuity_keeps_transition_modes_apart_and_the_scene_image_difference_is_paired():
    row = lambda task, run, mode, mad, clip, closeness, steps=3: {  # noqa: E731
        "task_id": task, "method": run, "transitions": mode, "steps": steps, "boundary_mad": mad,
        "boundary_clip": clip, "clip_i_scene_image": closeness}
    rows = [row("a", "cosed", "cut", 30.0, 4.0, 80.0), row("b", "cosed", "cut", 20.0, 2.0, None, steps=1),
            row("c", "cosed", "keyframe", 10.0, 1.0, 70.0),
            row("a", "cosed-no-scene-image", "cut", 31.0, 5.0, 75.0),
            row("c", "cosed-no-scene-image", "keyframe", 9.0, 1.0, 71.0)]
    runs = [EvalRun("cosed", "cosed", "untrained")]
    table = continuity_rows(rows, runs)
    assert [(r["transitions"], r["tasks"], r["boundaries"], r["boundary_clip"]["mean"]) for r in table] == [
        ("cut", 2, 2, 3.0), ("keyframe", 1, 2, 1.0)]
    [pair] = scene_image_rows(rows, scene_image_baselines(runs))
    assert pair["tasks"] == 2 and pair["with"]["mean"] == 75.0 and pair["without"]["mean"] == 73.0
    assert pair["difference"]["mean"] == pytest.approx(2.0) and pair["difference"]["low"] <= 2.0


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_cache):
    """`cosed evaluate --methods cosed` on tiny, in process: a 3-step task and a 2-step task with a scene image."""
    folder = tmp_path_factory.mktemp("measures")
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(folder / "me.jpg")
    tasks = [{"id": "sauce", "title": "Sauce", "steps": ["Dice the onion.", "Fry the onion.", "Add tomatoes."]},
             {"id": "bike", "title": "Bike", "steps": ["Flip the bike.", "Remove the wheel."],
              "scene_image": str(folder / "me.jpg")}]
    code = main(["evaluate", "--tasks", str(write_jsonl(folder / "t.jsonl", tasks)), "--out", str(folder / "run"),
                 "--no-ray", "--quiet", "--cache-dir", str(tiny_cache), "--methods", "cosed"])
    assert code == 0
    return folder


def embed_with(backend):
    return lambda images: backend.embed_images(EmbedImages(tuple(images)))


def manifest_of(run, name, task):
    return json.loads((run / name / task / "manifest.json").read_text())


@pytest.mark.slow
def test_boundary_clip_per_task_is_the_stored_clips_measured_again(evaluated, tiny_run):
    run, embed = evaluated / "run", embed_with(tiny_run[2])
    rows = {(r["method"], r["task_id"]): r for r in csv.DictReader((run / "metrics.csv").open())}
    assert set(rows) == {("cosed", "sauce"), ("cosed", "bike"), ("cosed-no-scene-image", "bike")}
    for (name, task), row in rows.items():
        manifest = manifest_of(run, name, task)
        clips = [(run / name / task / s["clip"]).read_bytes() for s in manifest["steps"]]
        assert len(clips) >= 2 and math.isfinite(float(row["boundary_clip"]))
        assert float(row["boundary_clip"]) == pytest.approx(clip_distance(boundaries(clips), embed), rel=1e-9)
        assert float(row["boundary_clip"]) > 0  # random weights: distinct frames, distinct embeddings
    summary = json.loads((run / "summary.json").read_text())
    [continuity] = summary["continuity"]
    assert (continuity["run"], continuity["transitions"], continuity["tasks"], continuity["boundaries"]) == (
        "cosed", "cut", 2, 3)
    assert continuity["boundary_clip"]["mean"] == pytest.approx(
        np.mean([float(rows[("cosed", t)]["boundary_clip"]) for t in ("sauce", "bike")]))
    assert summary["cosed"]["boundary_clip"]["n"] == 2 and summary["cosed"]["transitions"] == ["cut"]
    assert "| cosed | cut | 2 | 3 |" in (run / "measures.md").read_text()
    assert "boundary CLIP" in (run / "report.html").read_text()


@pytest.mark.slow
def test_the_scene_image_run_is_set_beside_the_same_run_without_it(evaluated, tiny_run):
    run, embed = evaluated / "run", embed_with(tiny_run[2])
    with_image, without = manifest_of(run, "cosed", "bike"), manifest_of(run, "cosed-no-scene-image", "bike")
    assert not (run / "cosed-no-scene-image" / "sauce").exists()  # only the tasks that have an image run again
    assert "scene_image" in with_image and "scene_image" not in without
    assert not (run / "cosed-no-scene-image" / "bike" / "scenes" / "step_00.png").exists()
    assert all(c["source"].get("step") != 0 for s in without["steps"] for c in s["candidates"])  # no step 0 in its pool
    assert any(c["source"].get("step") == 0 for s in with_image["steps"] for c in s["candidates"])
    assert without["fingerprint"] != with_image["fingerprint"]
    # the reference of both: the user's image at the text-to-image size, the pixels the run with it embedded
    stored = png_image((run / "cosed" / "bike" / "scenes" / "step_00.png").read_bytes())
    np.testing.assert_array_equal(stored, load(str(evaluated / "me.jpg"), 64, 64)[0])
    reference = embed([stored])[0]
    closeness = {name: clip_i_to(embed([png_image((run / name / "bike" / s["image"]).read_bytes())
                                        for s in m["steps"]]), reference)
                 for name, m in (("cosed", with_image), ("cosed-no-scene-image", without))}
    assert with_image["metrics"]["clip_i_scene_image"] == pytest.approx(closeness["cosed"], rel=1e-9)  # measured alike
    rows = {(r["method"], r["task_id"]): r for r in csv.DictReader((run / "metrics.csv").open())}
    for name in closeness:
        assert float(rows[(name, "bike")]["clip_i_scene_image"]) == pytest.approx(closeness[name], rel=1e-9)
    assert rows[("cosed", "sauce")]["clip_i_scene_image"] == ""
    [pair] = json.loads((run / "summary.json").read_text())["scene_image"]
    assert (pair["run"], pair["baseline"], pair["tasks"]) == ("cosed", "cosed-no-scene-image", 1)
    assert pair["difference"]["mean"] == pytest.approx(closeness["cosed"] - closeness["cosed-no-scene-image"])
    assert "Your scene image" in (run / "report.html").read_text()

