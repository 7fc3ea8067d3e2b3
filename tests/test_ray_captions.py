"""The caption stage on Ray: the lm rewriter's captioner in a pool of its own, batched across tasks.

Captions must be the same bytes whichever actor made them (and whatever shared their batch:
`test_captioner`), the job process must never load the captioner's model, and a resubmit finds every
caption in the cache.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import ray

from cosed import runner
from cosed.config import RunConfig
from cosed.distributed.job import run_on_ray
from cosed.runner import resolve_run

from conftest import REPO, local_ray, outputs, write_jsonl

pytestmark = pytest.mark.slow

TASKS = [{"id": "soup", "title": "Soup", "steps": ["Chop the leeks.", "Sweat them in butter."]},
         {"id": "frame", "title": "Frame", "steps": ["Cut the mitres.", "Glue the corners."]},
         {"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]}]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    with local_ray(num_cpus=6, num_gpus=4):
        yield


@pytest.fixture(scope="module")
def lm_config(tiny_cache):
    _, cfg = resolve_run(RunConfig(profile="tiny", rewriter="lm", cache_dir=str(tiny_cache)))
    assert cfg.rewriter_model == "tiny:captioner"  # the profile's captioner twin
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, max_concurrent_tasks=3))


def captions(out) -> dict[str, list[str]]:
    return {p.parent.name: [s["caption"] for s in json.loads(p.read_text())["steps"]] for p in out.glob("*/manifest.json")}


def generate_calls(summary: dict) -> tuple[int, int]:
    lives = [a for a in summary["actors"] if a["kind"] == "caption"]
    assert lives, "no caption pool in the run"
    return sum(a["generate_calls"] for a in lives), sum(a["generated"] for a in lives)


RUN = """
import json, sys
from cosed.config import RunConfig
from cosed.distributed.job import connect, run_on_ray
cfg = RunConfig(profile="tiny", rewriter="lm", cache_dir=sys.argv[3])
connect(sys.argv[4])
summary = run_on_ray(sys.argv[1], sys.argv[2], cfg, progress=False)
print(json.dumps({"done": sorted(summary.done), "failed": len(summary.failed),
                  "model_libraries": sorted(m for m in ("transformers", "diffusers") if m in sys.modules)}))
"""


def test_captions_on_ray_are_batched_identical_to_in_process_and_cached(tmp_path, lm_config, tiny_cache):
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    runner.run_in_process(str(tasks), str(tmp_path / "local"), lm_config, progress=False)

    # The Ray run in a process of its own, as `cosed generate` would be: it must not load a model library.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", RUN, str(tasks), str(tmp_path / "ray"), str(tiny_cache),
                           ray.get_runtime_context().gcs_address], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"done": ["frame", "soup", "tea"], "failed": 0, "model_libraries": []}
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")  # captions, and so every byte, alike
    calls, generated = generate_calls(json.loads((tmp_path / "ray" / "summary.json").read_text()))
    scenes = sum(len(t["steps"]) for t in TASKS)
    assert generated == scenes and calls < scenes  # every caption made once, in batches across tasks

    # A resubmit redoes the tasks but finds every caption in the output's cache: no generate call.
    again = run_on_ray(str(tasks), str(tmp_path / "ray"), lm_config, overwrite=True, progress=False)
    assert sorted(again.done) == ["frame", "soup", "tea"]
    assert generate_calls({"actors": again.actors}) == (0, 0)
    assert captions(tmp_path / "ray") == captions(tmp_path / "local")
