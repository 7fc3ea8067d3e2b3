"""Elasticity: a node with more logical GPUs joins during a run and gets model actors and work; a node
removed mid-step takes the text-to-image candidates in its object store with it and no task is lost."""

import dataclasses
import os
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from cosed.config import RunConfig
from cosed.distributed.job import run_on_ray
from cosed.runner import resolve_run

from conftest import outputs, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Every object above 1 KiB in the object store of the node that made it, as 512 px candidates are on a
    # real cluster (the tiny ones, 12 KiB, would otherwise travel inline with the call's answer).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "num_gpus": 3, "_system_config": {
        "max_direct_call_object_size": 1024}})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def a_task_is_written(out) -> bool:
    return bool(list(out.glob("*/manifest.json")))


def a_step_is_stored(out) -> bool:
    """A task has chosen its first step and is rendering the next one's candidates."""
    return bool(list(out.glob(".cosed-parts/*/*/step_01.json")))


def the_model_actors_hold_the_gpus(out) -> bool:
    """The run has placed its pools for the cluster as it was, and its sequencing is still to come: a tiny
    actor loads in seconds, the run sequences for tens of seconds."""
    return ray.available_resources().get("GPU", 0.0) < 1.0


def run_and_change_the_cluster(tmp_path, tasks, cfg, change, when=a_task_is_written):
    """(summary, what ``change()`` returned) of a Ray run of ``tasks`` into ``tmp_path/out``; ``change``
    runs on this (the main) thread, as Ray wants for adding and removing nodes, once ``when(out)`` holds
    and while the run goes on."""
    out = tmp_path / "out"
    result = {}
    run = threading.Thread(target=lambda: result.setdefault("summary", run_on_ray(
        str(write_jsonl(tmp_path / "t.jsonl", tasks)), str(out), cfg, progress=False)))
    run.start()
    deadline = time.time() + 300
    while time.time() < deadline and not when(out):
        time.sleep(0.2)
    assert run.is_alive(), "the run ended before the cluster could change"
    changed = change()
    run.join()
    return result["summary"], changed


def test_a_gpu_node_added_mid_run_gets_model_actors_and_work(cluster, tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config, ray=dataclasses.replace(tiny_config.ray, rescale_seconds=1.0,
                                                                   max_concurrent_tasks=2, rebalance=False))
    tasks = [{"id": f"t{i}", "title": f"Task {i}", "steps": ["Cut it.", "Sand it.", "Paint it."]} for i in range(12)]
    summary, node = run_and_change_the_cluster(tmp_path, tasks, cfg, lambda: cluster.add_node(num_cpus=4, num_gpus=2),
                                                when=the_model_actors_hold_the_gpus)
    assert len(summary.done) == 12
    pools = summary.extra["pools"]
    assert pools["sd"]["replicas"] >= 2 and pools["video"]["replicas"] >= 2
    assert sum(pool["gpus"] for pool in pools.values()) == pytest.approx(5)  # every GPU of both nodes, no more
    on_new_node = [a for a in summary.actors if a["node_id"] == node.node_id and a["kind"] in ("sd", "video")]
    assert len(on_new_node) >= 2  # its two GPUs hold model actors (which pools grow is the plan's: `grow_pools`)
    assert any(a["calls"] > 0 for a in on_new_node)  # and they took work


@pytest.mark.parametrize("profile", ["tiny-flux-ltx"])  # tiny: the harsher test below
def test_a_node_removed_mid_run_loses_no_task(cluster, tmp_path, tiny_cache, clean_outputs, profile):
    from test_chaos import TASKS

    tasks = TASKS[:3]
    _, resolved = resolve_run(RunConfig(profile=profile, cache_dir=str(tiny_cache)))
    node = cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.wait_for_nodes()
    cfg = dataclasses.replace(resolved, ray=dataclasses.replace(
        resolved.ray, rescale_seconds=1.0, max_concurrent_tasks=3, rebalance=False, call_timeout_floor_s=15.0))
    out = tmp_path / "out"
    summary, _ = run_and_change_the_cluster(tmp_path, tasks, cfg, lambda: cluster.remove_node(node))
    assert any(a["node_id"] == node.node_id for a in summary.actors), "no model actor ran on the removed node"
    assert sorted(summary.done) == sorted(t["id"] for t in tasks) and not summary.failed
    assert outputs(out) == clean_outputs(profile, tasks)  # every byte of every file


def test_a_node_holding_the_sd_candidates_removed_mid_step_loses_no_task(cluster, tmp_path, tiny_cache, clean_outputs,
                                                                       caplog):
    """Removed while tasks sequence, with every model actor on it (another job holds the head's GPUs until
    then, as a spot node that goes while the autoscaler brings capacity back): the SD candidates in its
    store go with it, and so do the drivers (drivers run on worker nodes), so each task in flight is retried
    and resumes at its last stored step; every task completes with every byte of a clean run. (A lost
    candidate seen by a surviving driver: `test_dispatch` on real Ray, `test_core` for the retry.)"""
    from test_chaos import TASKS, OtherJob

    tasks = TASKS[:3]
    _, resolved = resolve_run(RunConfig(profile="tiny", cache_dir=str(tiny_cache)))
    other = OtherJob.options(num_gpus=3).remote()  # every GPU of the head
    ray.get(other.ready.remote())
    node = cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.wait_for_nodes()
    cfg = dataclasses.replace(resolved, ray=dataclasses.replace(
        resolved.ray, rescale_seconds=1.0, max_concurrent_tasks=3, rebalance=False, call_timeout_floor_s=15.0))
    out = tmp_path / "out"

    def spot_loss():
        cluster.remove_node(node)
        ray.kill(other)

    try:
        summary, _ = run_and_change_the_cluster(tmp_path, tasks, cfg, spot_loss, when=a_step_is_stored)
    finally:
        ray.kill(other)
    print("retries:", [r.getMessage() for r in caplog.records if "retrying (attempt" in r.getMessage()])
    assert any(a["node_id"] == node.node_id and a["kind"] == "sd" for a in summary.actors), \
        "no text-to-image actor ran on the removed node"
    assert sorted(summary.done) == sorted(t["id"] for t in tasks) and not summary.failed, summary.failed
    assert outputs(out) == clean_outputs("tiny", tasks)  # every byte of every file
