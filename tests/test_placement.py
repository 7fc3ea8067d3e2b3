"""Where work runs on a cluster whose head has no GPU (as KubeRay and the launcher set it up): model actors,
drivers and writers on the GPU workers (drivers and writers with real CPU and memory requests, spread over
the nodes present now, a node that joins included); the autoscaler asked for the plan's GPUs and the
request cleared however the run ends; candidate thumbnails made where the candidates are rendered."""

import dataclasses
import io
import os

import numpy as np
import pytest
import ray
from PIL import Image
from ray.cluster_utils import Cluster

from cosed.calls import RenderRequest
from cosed.config import RunConfig
from cosed.distributed import job as job_module
from cosed.distributed.job import run_on_ray
from cosed.distributed.policies import (WORKER_RESOURCE, driver_destination, host_node, host_nodes,
                                        process_resources)
from cosed.runner import resolve_run

from conftest import write_jsonl

GIB = 2 ** 30

TASKS = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]},
         {"id": "toast", "title": "Toast", "steps": ["Slice the bread.", "Toast it."]}]


# --- the placement policy (pure) ------------------------------------------------------------------

def ray_node(node_id, head=False, alive=True, **resources):
    return {"NodeID": node_id, "Alive": alive,
            "Resources": {"CPU": 8.0, **({"node:__internal_head__": 1.0} if head else {}), **resources}}


def test_drivers_and_writers_go_to_marked_workers_else_off_the_head_else_to_the_only_node():
    head, a, b = ray_node("h", head=True), ray_node("a", GPU=1.0), ray_node("b", GPU=1.0)
    assert host_nodes([head]) == (["h"], False)                          # a laptop: the head is the only node
    assert host_nodes([head, a, b]) == (["a", "b"], False)               # never the head of a multi-node cluster
    assert host_nodes([head, a, b], where="any") == (["h", "a", "b"], False)
    marked = ray_node("m", **{WORKER_RESOURCE: 1.0})
    assert host_nodes([head, a, marked]) == (["m"], True)                # the cluster files mark their workers
    assert host_nodes([head, a, ray_node("m", alive=False, **{WORKER_RESOURCE: 1.0})]) == (["a"], False)


def test_the_least_loaded_node_takes_the_next_one_and_ties_go_round():
    assert host_node([], {}) is None
    assert host_node(["a", "b", "c"], {"a": 2, "b": 1, "c": 1}) == "b"
    assert [host_node(["a", "b", "c"], {}, turn) for turn in range(4)] == ["a", "b", "c", "a"]


def test_an_idle_driver_moves_to_a_node_that_joined_or_off_a_node_that_left_and_a_balanced_spread_stays():
    load = {"a": 3, "b": 1}
    assert driver_destination("a", ["a", "b"], load) == "b"              # two more than the least loaded
    assert driver_destination("a", ["a", "b"], {"a": 2, "b": 1}) is None  # one more: moving gains nothing
    assert driver_destination("gone", ["a", "b"], load) == "b"          # its node left
    assert driver_destination("h", ["a"], {"h": 2}) == "a"              # a worker appeared beside the head
    assert driver_destination("a", [], load) is None                     # nowhere known: stay


def test_driver_and_writer_requests_are_lowered_together_to_what_the_nodes_have_left():
    asks = [(0.5, 1.5 * GIB), (0.5, 1.0 * GIB)]
    assert process_resources(asks, [4, 2], [(8.0, 64 * GIB)] * 2) == asks    # room enough: as configured
    # 2 drivers and 1 writer per node want 1.5 CPUs and 4 GiB; the fuller node has 0.75 CPU and 2 GiB left.
    assert process_resources(asks, [4, 2], [(0.75, 2 * GIB), (4.0, 64 * GIB)]) == [(0.25, 0.75 * GIB),
                                                                                  (0.25, 0.5 * GIB)]
    assert process_resources(asks, [4, 2], [(0.0, 0.0)]) == [(0.0, 0.0), (0.0, 0.0)]  # nothing left: Ray places it
    assert process_resources(asks, [4, 2], []) == asks


# --- on a cluster whose head has no GPU -----------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from chaos import free_port

    # A dashboard (the state API's server) on a port of its own: other clusters may run on this machine.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0,
                                                            "dashboard_port": free_port()})
    # The GPU worker advertises the drivers' and writers' resource, as the shipped cluster files' workers do.
    worker = cluster.add_node(num_cpus=8, num_gpus=4, memory=16 * GIB, resources={WORKER_RESOURCE: 1})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_a_run_that_ends_by_an_interrupt_clears_its_autoscaler_request(cluster, tmp_path, tiny_config, monkeypatch):
    asked = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda bundles=None, **_: asked.append(bundles))
    monkeypatch.setenv("COSED_AUTOSCALE_MAX_GPUS", "6")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module.RayJob, "run", interrupted)
    cfg = dataclasses.replace(tiny_config, ray=dataclasses.replace(tiny_config.ray, gpu_wait_s=1.0))
    with pytest.raises(KeyboardInterrupt):
        run_on_ray(str(write_jsonl(tmp_path / "t.jsonl", TASKS)), str(tmp_path / "out"), cfg, progress=False)
    assert asked and asked[0] and asked[-1] == []


@pytest.mark.slow
def test_thumbnails_are_made_by_the_text_to_image_actor(cluster, tiny_cache):
    """What travels back for a kept candidate is a small PNG; the full image stays in the object store only
    while the step is scored (then the driver drops it)."""
    from cosed.distributed.actors import RemoteModelWorker

    _, cfg = resolve_run(RunConfig(profile="tiny", cache_dir=str(tiny_cache)))
    worker = RemoteModelWorker.options(num_gpus=1, num_cpus=1).remote("sd", cfg, ("sd",))
    sd = dataclasses.replace(cfg.sd, height=320, width=320)
    latents = np.zeros((2, 4, 40, 40), np.float32)
    refs = worker.run.options(num_returns=3).remote("c1", "render", RenderRequest("tea", latents, sd, (1,), 256))
    *images, (captured, thumbnails) = ray.get(refs)
    assert [image.shape for image in images] == [(320, 320, 3)] * 2  # for CLIP, by reference
    assert [Image.open(io.BytesIO(t)).size for t in thumbnails] == [(256, 256)] * 2
    assert sum(len(t) for t in thumbnails) < sum(image.nbytes for image in images)
    assert set(captured) == {1}
    ray.kill(worker)


@pytest.mark.slow
def test_work_stays_off_the_gpu_less_head_a_node_that_joins_gets_drivers_and_the_autoscaler_request_is_cleared(
        cluster, tmp_path, tiny_config, monkeypatch):
    """One run: model actors, drivers and writers never on the head (Ray's state API says where each ran);
    drivers and writers with real requests; a GPU worker that joins mid-run receives drivers and writers."""
    from ray.util.state import list_actors, list_tasks

    from test_elastic import run_and_change_the_cluster, the_model_actors_hold_the_gpus

    ray_cluster, worker = cluster
    asked = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda bundles=None, **_: asked.append(bundles))
    monkeypatch.setenv("COSED_AUTOSCALE_MAX_GPUS", "6")
    cfg = dataclasses.replace(tiny_config, save_candidates=True, ray=dataclasses.replace(
        tiny_config.ray, rescale_seconds=1.0, max_concurrent_tasks=3, rebalance=False,
        gpu_wait_s=5.0))  # the 6 never come
    tasks = [{"id": f"t{i}", "title": f"Task {i}", "steps": ["Cut it.", "Sand it."]} for i in range(8)]
    summary, joined = run_and_change_the_cluster(
        tmp_path, tasks, cfg, lambda: ray_cluster.add_node(num_cpus=4, num_gpus=1, resources={WORKER_RESOURCE: 1}),
        when=the_model_actors_hold_the_gpus)
    try:
        assert len(summary.done) == len(tasks) and not summary.failed
        head, workers = ray_cluster.head_node.node_id, {worker.node_id, joined.node_id}
        assert {a["node_id"] for a in summary.actors} <= workers
        assert summary.extra["process_resources"]["driver"] == {"num_cpus": 0.5, "memory": int(1.5 * GIB)}
        # This cluster's state API, named by its address: "auto" finds whichever cluster started last here.
        drivers = list_actors(address=ray_cluster.address, filters=[("class_name", "=", "TaskDriver")], limit=1000)
        assert drivers and {d.node_id for d in drivers} <= workers
        assert joined.node_id in {d.node_id for d in drivers}, "no driver on the node that joined"
        assert summary.extra["driver_moves"] >= 1
        written = run_and_wait(lambda: [t for t in list_tasks(address=ray_cluster.address, limit=1000,
                                                              filters=[("func_or_class_name", "=", "write_task")])
                                        if t.node_id], len(tasks))
        assert {t.node_id for t in written} == workers  # both workers, never the head
        # It asked for the GPUs its plan can use (up to the cluster's 6), then cleared the request.
        assert asked[0] and all(bundle == {"GPU": 1.0} for bundle in asked[0]) and len(asked[0]) <= 6
        assert asked[-1] == []
        # The kept candidates are thumbnails (what the text-to-image actor made), not the full images.
        shown = [Image.open(p).size for p in (tmp_path / "out" / "t0" / "candidates").rglob("*.png")]
        assert len(shown) == 4 + 4  # step 1: four fresh seeds; step 2: three pooled and one fresh
    finally:
        ray_cluster.remove_node(joined)


def run_and_wait(read, wanted: int):
    """What ``read()`` lists once it lists ``wanted`` items (the state API reports task events in batches)."""
    from chaos import wait_for

    return wait_for(lambda: (lambda found: found if len(found) >= wanted else None)(read()), 60, "the task events")
