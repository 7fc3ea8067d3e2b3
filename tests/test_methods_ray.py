"""The mora, t2v and talc methods on Ray (mora: a driver waits for the job's clip of the previous scene; t2v and
talc: drivers call the video pool with captions), with the bytes of the in-process run (tiny-flux-ltx, two small
tasks, one cluster for the three)."""

import pytest

from cosed import runner
from cosed.config import load_config
from cosed.distributed.job import run_on_ray
from cosed.evaluate import method_config

from conftest import local_ray, outputs, write_jsonl

pytestmark = pytest.mark.slow

TASKS = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves.", "Pour."]},
         {"id": "toast", "title": "Toast", "steps": ["Slice bread.", "Toast it."]}]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    with local_ray(num_cpus=6, num_gpus=4):
        yield


@pytest.mark.parametrize("method", ["mora", "t2v", "talc"])
def test_method_on_ray_equals_in_process(tmp_path, tiny_cache, method):
    cfg = method_config(load_config(None, {"profile": "tiny-flux-ltx", "cache_dir": str(tiny_cache)},
                                    default_preset="paper"), method)
    listed = write_jsonl(tmp_path / "t.jsonl", TASKS)
    runner.run_in_process(str(listed), str(tmp_path / "local"), cfg, progress=False)
    summary = run_on_ray(str(listed), str(tmp_path / "ray"), cfg, progress=False)
    assert sorted(summary.done) == ["tea", "toast"] and not summary.failed
    assert outputs(tmp_path / "ray", TASKS) == outputs(tmp_path / "local", TASKS)
