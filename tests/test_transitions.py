"""--transitions cut | dissolve | keyframe: the decisions, the config, the order clip calls leave in, the plan.

Whole videos on the tiny twins (frame counts decoded, keyframe conditioning, Ray == in process) are in
tests/test_transitions_videos.py (slow).
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from cosed import storage
from cosed.backend import make_backend
from cosed.cli import main
from cosed.config import ConfigError, RunConfig, from_dict
from cosed.distributed.costs import CostModel, task_work
from cosed.distributed.simulator import Cluster, simulate
from cosed.engine import manifest_config, sequence_task, task_fingerprint
from cosed.parts import TaskParts
from cosed.runner import resolve_run
from cosed.tasks import Task
from cosed.transitions import clips_ready, scene_starts, shared_frames
from cosed.video import decode_mp4, dissolve_mp4, dissolved, encode_mp4, stitch

from conftest import write_jsonl


@pytest.mark.parametrize("mode", ["cut", "dissolve", "keyframe"])
@pytest.mark.parametrize("total", [1, 2, 5])
def test_every_clip_is_settled_once_in_step_order(mode, total):
    settled = [step for chosen in range(1, total + 1) for step in clips_ready(chosen, total, mode)]
    assert settled == list(range(1, total + 1))


def test_a_keyframe_clip_waits_for_the_next_scene_and_the_last_for_the_last_step():
    assert [clips_ready(k, 4, "keyframe") for k in (1, 2, 3, 4)] == [[], [1], [2], [3, 4]]
    assert [clips_ready(k, 4, "cut") for k in (1, 2, 3, 4)] == [[1], [2], [3], [4]]


def test_dissolve_frame_count_and_scene_starts_agree_with_the_blend():
    clips = [np.full((n, 4, 4, 3), v, np.uint8) for n, v in ((6, 0), (3, 90), (6, 200))]
    frames = np.stack(list(dissolved(iter(clips), 4)))
    starts = scene_starts([6, 3, 6], 4)
    shared = [shared_frames(4, 6, 3), shared_frames(4, 3, 6)]
    assert shared == [1, 1]  # at most half of either clip
    assert len(frames) == 15 - sum(shared) == starts[-1] + 6
    assert starts == [0, 5, 7]
    assert (frames[:5] == 0).all() and (frames[-5:] == 200).all()
    assert 0 < frames[5, 0, 0, 0] < 90  # the blended boundary frame lies between both clips
    np.testing.assert_array_equal(stitch(clips, 4), frames)  # the in-memory path blends the same way


def test_dissolve_mp4_is_the_decoded_clips_blended_and_reproducible():
    rng = np.random.default_rng(0)
    clips = [encode_mp4(rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), 7) for _ in range(3)]
    video = dissolve_mp4(clips, 2, 7)
    assert video == dissolve_mp4(clips, 2, 7)
    decoded = decode_mp4(video)
    assert len(decoded) == 18 - 2 * 2
    expected = stitch([decode_mp4(c) for c in clips], 2)
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 12  # one more lossy encode, same frames


def test_transitions_enter_the_fingerprint_only_when_not_cut(tiny_run):
    profile, cfg, _ = tiny_run
    task = Task(id="t", title="T", steps=("a", "b"))
    assert "transitions" not in manifest_config(cfg) and "transition_frames" not in manifest_config(cfg)
    cut = task_fingerprint(task, profile, cfg)
    assert task_fingerprint(task, profile, dataclasses.replace(cfg, transition_frames=7)) == cut
    dissolve = task_fingerprint(task, profile, dataclasses.replace(cfg, transitions="dissolve"))
    keyframe = task_fingerprint(task, profile, dataclasses.replace(cfg, transitions="keyframe"))
    assert len({cut, dissolve, keyframe}) == 3
    assert task_fingerprint(task, profile, dataclasses.replace(cfg, transitions="dissolve", transition_frames=2)) \
        != dissolve
    assert manifest_config(dataclasses.replace(cfg, transitions="keyframe"))["transitions"] == "keyframe"


def test_config_validates_transitions():
    assert from_dict({"transitions": "dissolve", "transition_frames": 2}).transition_frames == 2
    with pytest.raises(ConfigError, match="transitions must be cut, dissolve, keyframe"):
        from_dict({"transitions": "wipe"})
    with pytest.raises(ConfigError, match="transition_frames"):
        from_dict({"transitions": "dissolve", "transition_frames": 0})


def test_keyframe_on_an_image_only_video_model_is_refused_in_one_line(tmp_path, tiny_cache, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "steps": ["x", "y"]}])
    code = main(["generate", "--no-ray", "--tasks", str(tasks), "--out", str(tmp_path / "out"), "--profile", "tiny",
                 "--cache-dir", str(tiny_cache), "--transitions", "keyframe", "--quiet"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "StableVideoDiffusionPipeline" in line and line.endswith("flux-ltx, tiny-flux-ltx")
    assert not (tmp_path / "out" / "a").exists()


def test_keyframe_adds_a_step_of_latency_per_clip_and_no_gpu_seconds():
    profile, cfg = resolve_run(RunConfig(profile="latency"))
    costs = CostModel.from_dict(profile.costs)
    keyed_cfg = dataclasses.replace(cfg, transitions="keyframe")
    cut, keyed = task_work(4, cfg, costs), task_work(4, keyed_cfg, costs)
    assert keyed.seconds == cut.seconds and keyed.calls == cut.calls
    assert keyed.critical_path > cut.critical_path
    plain = simulate([3] * 8, cfg, costs, Cluster(gpus=4))
    waited = simulate([3] * 8, keyed_cfg, costs, Cluster(gpus=4))
    assert waited.mean_latency_s > plain.mean_latency_s
    assert waited.tasks == plain.tasks == 8


def test_plan_prints_what_keyframe_transitions_add(tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "steps": ["x", "y", "z"]}])
    assert main(["plan", "--tasks", str(tasks), "--profile", "latency", "--gpus", "4", "--tasks-total", "8",
                 "--transitions", "keyframe", "--json", str(tmp_path / "plan.json")]) == 0
    printed = capsys.readouterr().out
    assert "keyframe transitions: mean task latency" in printed and "with cuts (+" in printed
    (record,) = json.loads((tmp_path / "plan.json").read_text())
    assert record["mean_latency_s"] > record["cut"]["mean_latency_s"]


def test_keyframe_clip_requests_leave_once_the_next_scene_is_chosen_and_name_it(tmp_path, monkeypatch):
    """The engine (in process and in a Ray driver alike) hands scene i's clip request on only after scene
    i+1 is stored, and the request names scene i+1's stored image by its content."""
    monkeypatch.setenv("COSED_TIME_SCALE", "0")
    profile, cfg = resolve_run(RunConfig(profile="latency", transitions="keyframe"))
    backend = make_backend(profile, cfg)
    events = []
    render = backend.render
    monkeypatch.setattr(backend, "render", lambda requests: events.append(("render", requests[0].caption))
                        or render(requests))
    task = Task(id="k", title="K", steps=("one", "two", "three"))
    parts = TaskParts.of(str(tmp_path), task.folder, "fp")
    sequence_task(task, ["c1", "c2", "c3"], backend, cfg, parts, on_scene=lambda r: events.append(("clip", r)))
    order = [(kind, value if kind == "render" else value.step) for kind, value in events]
    assert order == [("render", "c1"), ("render", "c2"), ("clip", 1), ("render", "c3"), ("clip", 2), ("clip", 3)]
    requests = [value for kind, value in events if kind == "clip"]
    for request, following in zip(requests, requests[1:]):
        assert request.next_scene == following.scene and request.next_scene_sha256 == following.scene_sha256
        assert hashlib.sha256(storage.read_bytes(request.next_scene)).hexdigest() == following.scene_sha256
        assert following.scene_sha256[:16] in request.clip  # the clip is named by both scenes
    assert requests[-1].next_scene == "" and requests[-1].next_scene_sha256 == ""


def test_boundary_continuity_is_lower_where_clips_meet_on_the_same_frame():
    from cosed.continuity import boundaries, clip_distance, pixel_distance

    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3))
    still = lambda *frames: encode_mp4(np.stack(frames), 7)  # noqa: E731
    joined = [still(a, b), still(b, c)]  # clip 1 ends on the frame clip 2 starts from (what keyframe aims at)
    cut = [still(a, b), still(c, a)]
    pairs = boundaries(joined)
    assert len(pairs) == 1 and pairs[0][0].shape == (16, 16, 3)
    assert pixel_distance(boundaries(joined)) < 15 < 60 < pixel_distance(boundaries(cut))  # H.264 is lossy
    colour = lambda images: np.stack([im.reshape(-1, 3).mean(axis=0) - 127 for im in images])  # noqa: E731
    assert clip_distance(boundaries(joined), colour) < clip_distance(boundaries(cut), colour)
    assert pixel_distance(boundaries(joined[:1])) is None


def test_a_keyframe_sequence_resumed_mid_task_sends_the_clip_requests_of_a_clean_run(tmp_path, monkeypatch):
    """A driver that dies after step 2 (clip 1 handed on) is retried: the retry reads steps 1-2 back and
    hands on the same requests, in the same order, as a run that never stopped; so does a resume of the whole
    stored sequence (`stored_sequence`)."""
    from cosed.engine import stored_sequence

    monkeypatch.setenv("COSED_TIME_SCALE", "0")
    profile, cfg = resolve_run(RunConfig(profile="latency", transitions="keyframe"))
    backend = make_backend(profile, cfg)
    task = Task(id="r", title="R", steps=("one", "two", "three", "four"))
    captions = ["c1", "c2", "c3", "c4"]
    clean = []
    sequence_task(task, captions, backend, cfg, TaskParts.of(str(tmp_path / "a"), "r", "fp"), on_scene=clean.append)

    class Died(Exception):
        pass

    def dies(request):
        raise Died

    parts = TaskParts.of(str(tmp_path / "b"), "r", "fp")
    with pytest.raises(Died):
        sequence_task(task, captions, backend, cfg, parts, on_scene=dies)
    resumed = []
    renders = []
    render = backend.render
    monkeypatch.setattr(backend, "render", lambda requests: renders.append(1) or render(requests))
    sequence_task(task, captions, backend, cfg, parts, on_scene=resumed.append)
    relative = lambda requests: [dataclasses.replace(r, scene=r.scene.split("/fp/")[1], clip=r.clip.split("/fp/")[1],  # noqa: E731
                                                     next_scene=r.next_scene.split("/fp/")[-1]) for r in requests]
    assert relative(resumed) == relative(clean) and len(clean) == 4
    assert len(renders) == 2  # steps 1 and 2 were read back, not rendered again
    assert relative(stored_sequence(task, cfg, parts)) == relative(clean)
