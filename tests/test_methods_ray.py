"""The mora and t2v methods on Ray (mora: a driver waits for the job's clip of the previous scene; t2v: drivers
call the video pool with captions), with the bytes of the in-process run (tiny-flux-ltx, two small tasks)."""

import dataclasses

import pytest

from cosed import runner
from cosed.config import RunConfig, load_config
from cosed.distributed.job import run_on_ray
from cosed.evaluate import method_config

from conftest import local_ray, outputs, write_jsonl

pytestmark = pytest.mark.slow

TASKS = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves.", "Pour."]},
         {"id": "toast", "title": "Toast", "steps": ["Slice bread.", "Toast it."]}]


def test_mora_on_ray_equals_in_process(tmp_path, tiny_cache):
    cfg = method_config(load_config(None, {"profile": "tiny-flux-ltx", "cache_dir": str(tiny_cache)},
                                    default_preset="paper"), "mora")
    listed = write_jsonl(tmp_path / "t.jsonl", TASKS)
    runner.run_in_process(str(listed), str(tmp_path / "local"), cfg, progress=False)
    with local_ray(num_cpus=6, num_gpus=4):
        summary = run_on_ray(str(listed), str(tmp_path / "ray"), cfg, progress=False)
    assert sorted(summary.done) == ["tea", "toast"] and not summary.failed
    assert outputs(tmp_path / "ray", TASKS) == outputs(tmp_path / "local", TASKS)


def test_t2v_on_ray_equals_in_process(tmp_path, tiny_cache):
    cfg = method_config(load_config(None, {"profile": "tiny-flux-ltx", "cache_dir": str(tiny_cache)},
                                    default_preset="paper"), "t2v")
    listed = write_jsonl(tmp_path / "t.jsonl", TASKS)
    runner.run_in_process(str(listed), str(tmp_path / "local"), cfg, progress=False)
    with local_ray(num_cpus=6, num_gpus=4):
        summary = run_on_ray(str(listed), str(tmp_path / "ray"), cfg, progress=False)
    assert sorted(summary.done) == ["tea", "toast"] and not summary.failed
    assert outputs(tmp_path / "ray", TASKS) == outputs(tmp_path / "local", TASKS)


def test_talc_on_ray_equals_in_process(tmp_path, tiny_cache):
    cfg = method_config(load_config(None, {"profile": "tiny-flux-ltx", "cache_dir": str(tiny_cache)},
                                    default_preset="paper"), "talc")
    listed = write_jsonl(tmp_path / "t.jsonl", TASKS)
    runner.run_in_process(str(listed), str(tmp_path / "local"), cfg, progress=False)
    with local_ray(num_cpus=6, num_gpus=4):
        summary = run_on_ray(str(listed), str(tmp_path / "ray"), cfg, progress=False)
    assert sorted(summary.done) == ["tea", "toast"] and not summary.failed
    assert outputs(tmp_path / "ray", TASKS) == outputs(tmp_path / "local", TASKS)
