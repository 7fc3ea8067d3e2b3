"""Method names of `cosed evaluate`: `chain` (Bordalo et al.'s single-preceding-step latent chaining) and its
old name `previous`, still accepted."""

import pytest

from cosed.config import RunConfig, load_config
from cosed.evaluate import method_config, plan_runs


def test_previous_is_the_old_name_of_chain(capsys):
    cfg = RunConfig()
    assert [r.name for r in plan_runs(["independent", "previous", "cosed"], None, cfg)] == [
        "independent", "chain", "cosed"]
    assert method_config(cfg, "previous") == method_config(cfg, "chain")
    assert method_config(cfg, "chain").pool.steps == "previous"
    assert "now called 'chain'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chain"):
        method_config(cfg, "mora-like")


def test_independent_keeps_its_fresh_candidate_under_the_paper_preset():
    from cosed.config import load_config

    paper = load_config(None, {}, default_preset="paper")
    independent = method_config(paper, "independent")
    assert independent.pool.fresh_as == "candidate" and independent.pool.steps == "none"


def test_evaluate_reports_video_length_and_seconds_per_scene_with_intervals(tmp_path):
    """The paper's Table 1 length column from each manifest: frames / fps, and per scene."""
    import json

    from cosed.evaluate import EvalRun, ablation_csv, metric_rows, summarise

    for method, videos in (("cosed", [(3, 75, 7), (2, 50, 7)]), ("chain", [(3, 75, 7), (2, 44, 8)])):
        for k, (steps, frames, fps) in enumerate(videos):
            folder = tmp_path / method / f"t{k}"
            folder.mkdir(parents=True)
            (folder / "manifest.json").write_text(json.dumps({
                "task_id": f"t{k}", "metrics": {"clip_i": 0.5, "clip_t": 0.3}, "steps": [{"step": n, "chosen": 0, "candidates": [{"source": {"kind": "fresh"}}]}
                                                   for n in range(1, steps + 1)],
                "video_frames": frames, "fps": fps, "config": {}}))
    rows = metric_rows(str(tmp_path), ["cosed", "chain"])
    assert [(r["method"], r["video_seconds"], r["seconds_per_scene"]) for r in rows] == [
        ("cosed", 75 / 7, 75 / 7 / 3), ("cosed", 50 / 7, 25 / 7), ("chain", 75 / 7, 75 / 7 / 3), ("chain", 5.5, 2.75)]
    summary = summarise(rows, ["cosed", "chain"])
    stat = summary["chain"]["video_seconds"]
    assert stat["mean"] == pytest.approx((75 / 7 + 5.5) / 2) and stat["low"] <= stat["mean"] <= stat["high"]
    assert summary["cosed"]["seconds_per_scene"]["mean"] == pytest.approx(25 / 7)
    from cosed.evaluate import ablation_rows

    table = ablation_csv(ablation_rows(summary, [EvalRun("cosed", "cosed", "untrained")]))
    assert "video_seconds_low" in table.splitlines()[0] and "3.5714" in table


@pytest.mark.slow
def test_mora_starts_each_scene_from_the_previous_clips_last_frame(tmp_path, tiny_cache):
    """tiny-flux-ltx, in process: scene i >= 2 is the last decoded frame of clip i-1, no text-to-image call after
    step 1, the output contract holds, and a rerun gives the same bytes."""
    import json

    import numpy as np

    from cosed.cli import main
    from cosed.images import png_image
    from cosed.video import decode_mp4

    from conftest import outputs, write_jsonl

    tasks = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves.", "Pour the tea."]}]
    listed = write_jsonl(tmp_path / "t.jsonl", tasks)
    runs = []
    for name in ("a", "b"):
        assert main(["generate", "--method", "mora", "--tasks", str(listed), "--out", str(tmp_path / name),
                     "--no-ray", "--profile", "tiny-flux-ltx", "--cache-dir", str(tiny_cache), "--quiet"]) == 0
        runs.append(outputs(tmp_path / name, tasks))
    assert runs[0] == runs[1]
    folder = tmp_path / "a" / "tea"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"]["method"] == "mora" and manifest["preset"]["name"] == "paper"
    assert [s["candidates"][s["chosen"]]["source"]["kind"] for s in manifest["steps"]] == ["fresh", "clip", "clip"]
    for n in (2, 3):
        last = decode_mp4((folder / "clips" / f"step_{n - 1:02d}.mp4").read_bytes())[-1]
        np.testing.assert_array_equal(png_image((folder / "scenes" / f"step_{n:02d}.png").read_bytes()), last)
    frames = decode_mp4((folder / "video.mp4").read_bytes())
    assert len(frames) == manifest["video_frames"] == 3 * manifest["config"]["video"]["num_frames"]


@pytest.mark.slow
def test_t2v_sends_each_caption_straight_to_the_text_to_video_model(tmp_path, tiny_cache, monkeypatch, capsys):
    """tiny-flux-ltx, in process: LTX-Video's text-to-video pipeline gets the caption alone (no image), the
    scene is the clip's first frame, reruns are identical; a profile without text-to-video says so."""
    import json

    import diffusers
    import numpy as np

    from cosed.cli import main
    from cosed.images import png_image
    from cosed.video import decode_mp4

    from conftest import outputs, write_jsonl

    calls = []
    original = diffusers.LTXPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.LTXPipeline, "__call__", spy)
    tasks = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]}]
    listed = write_jsonl(tmp_path / "t.jsonl", tasks)
    runs = []
    for name in ("a", "b"):
        assert main(["generate", "--method", "t2v", "--tasks", str(listed), "--out", str(tmp_path / name),
                     "--no-ray", "--profile", "tiny-flux-ltx", "--preset", "legacy", "--rewriter", "identity",
                     "--cache-dir", str(tiny_cache), "--quiet"]) == 0
        runs.append(outputs(tmp_path / name, tasks))
    assert runs[0] == runs[1]
    assert [c["prompt"] for c in calls[:2]] == tasks[0]["steps"] and all("image" not in c for c in calls)
    folder = tmp_path / "a" / "tea"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["candidates"][0]["source"]["kind"] for s in manifest["steps"]] == ["text", "text"]
    for n in (1, 2):
        first = decode_mp4((folder / "clips" / f"step_{n:02d}.mp4").read_bytes())[0]
        np.testing.assert_array_equal(png_image((folder / "scenes" / f"step_{n:02d}.png").read_bytes()), first)
    capsys.readouterr()
    assert main(["generate", "--method", "t2v", "--tasks", str(listed), "--out", str(tmp_path / "svd"), "--no-ray",
                 "--profile", "tiny", "--cache-dir", str(tiny_cache), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "profile tiny has no text-to-video model" in line and not (tmp_path / "svd").exists()


@pytest.mark.slow
def test_talc_makes_one_time_aligned_generation_per_task(tmp_path, tiny_cache, monkeypatch):
    """tiny-flux-ltx, in process: one LTXPipeline call per task with every caption's embeddings side by side and
    the time-aligned processor on each cross-attention during it; scenes split from the one video; reruns
    identical."""
    import json

    import diffusers

    from cosed.cli import main
    from cosed.talc import TimeAlignedAttnProcessor
    from cosed.video import decode_mp4

    from conftest import outputs, write_jsonl

    calls = []
    original = diffusers.LTXPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append((kwargs, [type(b.attn2.processor) for b in self.transformer.transformer_blocks]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.LTXPipeline, "__call__", spy)
    tasks = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves.", "Pour the tea."]}]
    listed = write_jsonl(tmp_path / "t.jsonl", tasks)
    runs = []
    for name in ("a", "b"):
        assert main(["generate", "--method", "talc", "--tasks", str(listed), "--out", str(tmp_path / name),
                     "--no-ray", "--profile", "tiny-flux-ltx", "--cache-dir", str(tiny_cache), "--quiet"]) == 0
        runs.append(outputs(tmp_path / name, tasks))
    assert runs[0] == runs[1] and len(calls) == 2  # one generation per task and run
    kwargs, processors = calls[0]
    assert kwargs["prompt_embeds"].shape[1] == 3 * 128 and set(processors) == {TimeAlignedAttnProcessor}
    manifest = json.loads((tmp_path / "a" / "tea" / "manifest.json").read_text())
    n = manifest["config"]["video"]["num_frames"]
    assert kwargs["num_frames"] == 3 * (n - 1) + 1 == manifest["video_frames"]
    assert [s["frames"] for s in manifest["steps"]] == [n, n - 1, n - 1]
    assert len(decode_mp4((tmp_path / "a" / "tea" / "video.mp4").read_bytes())) == 3 * (n - 1) + 1


def test_the_cost_model_follows_each_methods_calls():
    """Pool sizing and `cosed plan` see what each method asks of the pools: t2v and talc no text-to-image,
    mora text-to-image for step 1 only, talc one video call of about a clip per scene."""
    import dataclasses

    from cosed.distributed.costs import CostModel, task_work
    from cosed.models.profiles import resolve_profile

    costs = CostModel.from_dict(resolve_profile("sd21-svd").costs)
    base = load_config(None, {"profile": "sd21-svd"}, default_preset="paper")
    work = {m: task_work(4, method_config(base, m), costs) for m in ("cosed", "mora", "t2v", "talc")}
    clip = costs.seconds("animate", 1)
    assert work["t2v"].seconds["sd"] == 0 and work["t2v"].calls["animate"] == 4 and work["t2v"].images == 0
    assert work["talc"].seconds["sd"] == 0 and work["talc"].calls["animate"] == 1
    assert work["talc"].seconds["video"] == pytest.approx(4 * clip)
    assert work["mora"].images == 4 and work["mora"].calls["render"] == 1 and work["mora"].calls["animate"] == 4
    assert work["cosed"].images > work["mora"].images
    assert work["mora"].critical_path >= 4 * clip  # each scene waits for the clip before it
    assert dataclasses.replace(base, method="cosed") == method_config(base, "cosed")
