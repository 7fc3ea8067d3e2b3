"""The latency profile on a local Ray cluster of 4 logical GPUs: the real job code around simulated models."""

import json
import os

import pytest
import ray

from cosed.config import RunConfig
from cosed.distributed.costs import CostModel, OPERATIONS, batch_work
from cosed.distributed.job import run_on_ray
from cosed.engine import manifest_without_timings
from cosed.runner import resolve_run, run_in_process

from conftest import write_jsonl

pytestmark = pytest.mark.slow

STEPS = [2, 5, 3, 4]
TASKS = [{"id": f"t{i}", "title": f"Task {i}", "steps": [f"Do part {j} of task {i}." for j in range(n)]}
         for i, n in enumerate(STEPS)]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=4, num_gpus=4, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"COSED_TIME_SCALE": "0.002"}})
    yield
    ray.shutdown()


def test_latency_run_at_4_gpus_makes_the_predicted_calls_per_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("COSED_TIME_SCALE", "0.002")
    tasks = str(write_jsonl(tmp_path / "t.jsonl", TASKS))
    cfg = RunConfig(profile="latency")
    summary = run_on_ray(tasks, str(tmp_path / "ray"), cfg, progress=False)
    assert sorted(summary.done) == sorted(t["id"] for t in TASKS) and not summary.failed

    profile, resolved = resolve_run(cfg)
    expected = batch_work(STEPS, resolved, CostModel.from_dict(profile.costs)).calls
    calls = {kind: sum(a["calls"] for a in summary.actors if a["kind"] == kind) for kind in ("sd", "video", "clip")}
    assert calls == {kind: sum(n for op, n in expected.items() if OPERATIONS[op] == kind)
                     for kind in ("sd", "video", "clip")}

    plan = json.loads((tmp_path / "ray" / "summary.json").read_text())["plan"]
    assert plan["policy"] == "cost"
    assert plan["pools"]["sd"]["replicas"] + plan["pools"]["video"]["replicas"] == 4
    assert plan["pools"]["video"]["replicas"] > plan["pools"]["sd"]["replicas"]
    assert 0 < plan["pools"]["clip"]["num_gpus"] < 1

    local = run_in_process(tasks, str(tmp_path / "local"), cfg, progress=False)
    assert sorted(local.done) == sorted(summary.done)
    for task in TASKS:
        read = lambda out: manifest_without_timings(json.loads((tmp_path / out / task["id"] / "manifest.json").read_text()))  # noqa: E731
        assert read("ray") == read("local")
        for scene in (tmp_path / "local" / task["id"] / "scenes").iterdir():
            assert (tmp_path / "ray" / task["id"] / "scenes" / scene.name).read_bytes() == scene.read_bytes()


def test_drivers_writers_and_simulated_actors_do_not_import_model_libraries():
    """They never load a model; diffusers and transformers would cost each such process ~100 MB."""
    import subprocess
    import sys

    code = ("import sys, cosed.distributed.job, cosed.simulate; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
