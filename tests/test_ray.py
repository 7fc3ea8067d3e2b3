"""The Ray path on a local cluster declared with 4 logical GPUs (no hardware needed)."""

import dataclasses
import json
import os
import signal
import threading
import time

import pytest
import ray
from ray.util.state import list_actors

from cosed import runner
from cosed.config import RunConfig
from cosed.distributed.job import run_on_ray, start_pools
from cosed.distributed.sizing import plan_pools
from cosed.engine import manifest_without_timings

from conftest import SMALL_TASKS, local_ray, write_jsonl

pytestmark = pytest.mark.slow

TASKS = SMALL_TASKS


@pytest.fixture(scope="module", autouse=True)
def cluster():
    with local_ray(num_cpus=6, num_gpus=4):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_run):
    """The in-process result the Ray path must reproduce."""
    _, cfg, backend = tiny_run
    folder = tmp_path_factory.mktemp("ref")
    runner.run_in_process(str(write_jsonl(folder / "t.jsonl", TASKS)), str(folder / "out"), cfg,
                          progress=False, backend=backend)
    return {p.parent.name: manifest_without_timings(json.loads(p.read_text()))
            for p in (folder / "out").glob("*/manifest.json")}


def ray_config(tiny_config, **ray_fields) -> RunConfig:
    return dataclasses.replace(tiny_config, ray=dataclasses.replace(tiny_config.ray, **ray_fields))


def outputs(out) -> dict:
    return {p.parent.name: manifest_without_timings(json.loads(p.read_text())) for p in out.glob("*/manifest.json")}


def test_sd_video_and_clip_actors_are_pinned_to_distinct_gpus(tiny_config):
    pools = start_pools(tiny_config)
    assert pools.describe()["sd"] == {"replicas": 2, "num_gpus": 1.0}
    stats = pools.stats()
    assert sorted(s["kind"] for s in stats) == ["clip", "sd", "sd", "video"]
    gpu_ids = [tuple(s["gpu_ids"]) for s in stats]
    assert all(len(ids) == 1 for ids in gpu_ids) and len(set(gpu_ids)) == 4
    assert {s["cuda_visible_devices"] for s in stats} == {ids[0] for ids in gpu_ids}
    pools.shutdown()


@pytest.mark.parametrize("drivers", [1, 3])
def test_ray_path_equals_in_process(tmp_path, tiny_config, reference, drivers):
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    summary = run_on_ray(str(tasks), str(tmp_path / "out"), ray_config(tiny_config, max_concurrent_tasks=drivers),
                         progress=False)
    assert sorted(summary.done) == ["sauce", "shelf", "tea"] and not summary.failed
    assert outputs(tmp_path / "out") == reference
    assert set(summary.extra["busy_fraction"]) == {"sd", "video", "clip"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["done"] == 3


def kill_first(prefix_filter, after_calls_wait: float):
    """SIGKILL the process of the first live actor whose name or class matches, once it exists."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for actor in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                                 detail=True):
            if prefix_filter(actor) and actor.pid:
                time.sleep(after_calls_wait)
                try:
                    os.kill(actor.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                return actor
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("victim", ["sd", "driver"])
def test_a_killed_actor_has_its_work_redone(tmp_path, tiny_config, reference, victim):
    match = {"sd": lambda a: (a.name or "").endswith("-sd-0"),
             "driver": lambda a: a.class_name == "TaskDriver"}[victim]
    killed = {}
    thread = threading.Thread(target=lambda: killed.setdefault("actor", kill_first(match, 3.0)))
    thread.start()
    tasks = write_jsonl(tmp_path / "t.jsonl", TASKS)
    summary = run_on_ray(str(tasks), str(tmp_path / "out"), ray_config(tiny_config, max_concurrent_tasks=2),
                         progress=False)
    thread.join()
    assert killed["actor"] is not None
    assert sorted(summary.done) == ["sauce", "shelf", "tea"] and not summary.failed
    assert outputs(tmp_path / "out") == reference


def test_a_rejected_task_is_reported_and_the_others_finish(tmp_path, tiny_config):
    one_step = dict(TASKS[2], id="one-step", steps=["Boil water."])
    tasks = write_jsonl(tmp_path / "t.jsonl", [TASKS[2], {"id": "nosteps"}, one_step])
    summary = run_on_ray(str(tasks), str(tmp_path / "out"), tiny_config, progress=False)
    assert sorted(summary.done) == ["one-step", "tea"] and [e.task_id for e in summary.rejected] == ["nosteps"]
    assert json.loads((tmp_path / "out" / "errors.jsonl").read_text())["field"] == "steps"
    assert json.loads((tmp_path / "out" / "one-step" / "manifest.json").read_text())["metrics"]["clip_i"] is None


def test_pool_plan_for_single_gpu_and_cpu_only_nodes(tiny_config):
    one_gpu = plan_pools(tiny_config.ray, cluster_gpus=1, cluster_cpus=8)
    assert {k: (p.replicas, p.num_gpus) for k, p in one_gpu.items()} == {
        "sd": (1, 0.3333), "video": (1, 0.3333), "clip": (1, 0.3333)}
    cpu = plan_pools(tiny_config.ray, cluster_gpus=0, cluster_cpus=2)
    assert all(p.num_gpus == 0 and p.replicas == 1 for p in cpu.values())
    grown = plan_pools(tiny_config.ray, cluster_gpus=8, cluster_cpus=32, fixed_gpus={"sd": 1, "video": 1, "clip": 1})
    assert (grown["sd"].replicas, grown["video"].replicas, grown["clip"].replicas) == (4, 3, 1)
