"""The run's plan: bytes from the profile and the run config only, stored under the output and reused by every
resubmit; finished work never deleted because the cluster changed, nor before its replacement exists."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from cosed import runner, storage
from cosed.config import RunConfig
from cosed.runplan import PLAN, plan_run, read_plan

from conftest import SMALL_TASKS, local_ray, outputs, write_jsonl

SD21_SVD_MEMORY = {"sd": {"plain": 14.0, "savers": 8.0, "offload": 6.0},
                   "video": {"plain": 16.0, "savers": 12.5, "offload": 8.0},
                   "clip": {"plain": 0.5, "savers": 0.5, "offload": 0.5}}


def test_the_plan_is_stored_and_reused_whatever_gpus_a_later_run_finds(tmp_path, tiny_cache):
    cfg = RunConfig(profile="sd21-svd", cache_dir=str(tiny_cache))
    out = str(tmp_path / "out")
    lines: list[str] = []
    first = plan_run(cfg, out, lambda: 16.0, say=lines.append)
    assert first.cfg.memory_plan == {"sd": "savers", "video": "savers"} and first.gpu_from == "probed"
    assert read_plan(out)["gpu_memory_gib"] == 16.0 and not lines
    # The cluster now has 80 GiB GPUs: the stored plan stays (one line says so), the config is the same value.
    again = plan_run(cfg, out, lambda: 80.0, say=lines.append)
    assert again.reused and again.cfg == first.cfg
    assert len(lines) == 1 and "keeping the output's stored plan" in lines[0] and "--replan" in lines[0]
    lines.clear()
    assert plan_run(cfg, out, lambda: 16.0, say=lines.append).cfg == first.cfg and not lines
    # Told otherwise: the new plan replaces the stored one.
    replanned = plan_run(cfg, out, lambda: 80.0, replan=True, say=lines.append)
    assert replanned.cfg.memory_plan == {} and read_plan(out)["gpu_memory_gib"] == 80.0 and len(lines) == 1
    # A declared size needs no probe, and a plain plan depends on no GPU at all.
    declared = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, gpu_memory_gib=26.0))
    fresh = plan_run(declared, str(tmp_path / "other"), lambda: pytest.fail("probed"), say=lines.append)
    assert fresh.gpu_from == "declared" and fresh.cfg.memory_plan == {}


def _memory_profile(tmp_path: Path, tiny_cache: Path) -> str:
    """The tiny models as a profile folder that declares sd21-svd's memory figures."""
    folder = tmp_path / "tiny-with-memory"
    folder.mkdir()
    zoo = tiny_cache / "tiny-v1"
    for kind in ("sd", "video", "clip"):
        os.symlink(zoo / kind, folder / kind)
    tiny = json.loads((Path(runner.__file__).parent / "profiles" / "tiny.json").read_text())
    dtypes = {"sd": {"dtype": "float32"}, "video": {"dtype": "float32"}, "clip": {}}
    (folder / "profile.json").write_text(json.dumps({
        "name": "tiny-with-memory", "random_weights": True, "defaults": tiny["defaults"], "costs": tiny["costs"],
        "models": {kind: {**dtypes[kind], "memory_gib": SD21_SVD_MEMORY[kind]} for kind in dtypes}}))
    return str(folder)


@pytest.mark.slow
def test_a_resubmit_after_the_cluster_grew_redoes_and_deletes_nothing(tmp_path, tiny_cache):
    """Run on 1 GPU, then the same command once the cluster has 4 (26 GiB GPUs declared): nothing redone or
    removed, and a fresh run on 4 GPUs gives the same bytes as the 1-GPU run."""
    from cosed.distributed.job import run_on_ray

    cfg = RunConfig(profile=_memory_profile(tmp_path, tiny_cache), cache_dir=str(tiny_cache))
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, gpu_memory_gib=26.0))
    tasks = write_jsonl(tmp_path / "tasks.jsonl", SMALL_TASKS[2:])
    out = tmp_path / "out"
    with local_ray(num_gpus=1):
        first = run_on_ray(str(tasks), str(out), cfg, progress=False)
    assert first.done == ["tea"] and not first.failed
    before = outputs(out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "tea").rglob("*") if p.is_file()}
    with local_ray(num_gpus=4):
        again = run_on_ray(str(tasks), str(out), cfg, progress=False)
        fresh = run_on_ray(str(tasks), str(tmp_path / "fresh"), cfg, progress=False)
    assert again.done == [] and again.skipped == ["tea"] and again.stale == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not one file rewritten or removed
    assert outputs(out) == before
    assert fresh.done == ["tea"] and outputs(tmp_path / "fresh") == before


class Killed(BaseException):
    """Stands for the job being killed: not an `Exception`, so no task-level handler catches it."""


def test_a_redo_keeps_the_old_task_until_its_replacement_is_written(tmp_path, tiny_run, monkeypatch):
    profile, cfg, backend = tiny_run
    tasks = write_jsonl(tmp_path / "tasks.jsonl", SMALL_TASKS[2:])
    out = tmp_path / "out"
    runner.run_in_process(str(tasks), str(out), cfg, progress=False, backend=backend)
    old = outputs(out)
    changed = dataclasses.replace(cfg, seed=1)  # a real change: the task is redone

    # Killed while its clips render: the old task is intact, every file and its manifest.
    animate = backend.animate

    def killed(request):
        if request.step == 2:
            raise Killed()
        return animate(request)

    monkeypatch.setattr(backend, "animate", killed)
    with pytest.raises(Killed):
        runner.run_in_process(str(tasks), str(out), changed, progress=False, backend=backend)
    assert outputs(out) == old
    monkeypatch.setattr(backend, "animate", animate)

    # Killed while the writer replaces the files: no manifest names a mix of old and new files.
    write_bytes = storage.write_bytes

    def dies_at_the_video(uri, data, *args, **kwargs):
        if uri.endswith("video.mp4"):
            raise Killed()
        return write_bytes(uri, data, *args, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", dies_at_the_video)
    with pytest.raises(Killed):
        runner.run_in_process(str(tasks), str(out), changed, progress=False, backend=backend)
    assert not (out / "tea" / "manifest.json").exists()
    monkeypatch.setattr(storage, "write_bytes", write_bytes)

    summary = runner.run_in_process(str(tasks), str(out), changed, progress=False, backend=backend)
    assert summary.done == ["tea"]
    new = outputs(out)
    assert new["tea/manifest.json"]["fingerprint"] == summary.fingerprints["tea"] != old["tea/manifest.json"][
        "fingerprint"]
    assert new["tea/video.mp4"] != old["tea/video.mp4"]
    assert set(new) == set(old)  # the same files, nothing of the old run left unlisted
    assert Path(out, PLAN).is_file()
