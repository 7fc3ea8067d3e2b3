"""Method names of `cosed evaluate`: `chain` (Bordalo et al.'s single-preceding-step latent chaining) and its
old name `previous`, still accepted."""

import pytest

from cosed.config import RunConfig
from cosed.evaluate import method_config, plan_runs


def test_previous_is_the_old_name_of_chain():
    cfg = RunConfig()
    assert [r.name for r in plan_runs(["independent", "previous", "cosed"], None, cfg)] == [
        "independent", "chain", "cosed"]
    assert method_config(cfg, "previous") == method_config(cfg, "chain")
    assert method_config(cfg, "chain").pool.steps == "previous"
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
                "video_frames": frames, "fps": fps}))
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
