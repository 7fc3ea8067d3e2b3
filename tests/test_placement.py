"""Where work runs on a cluster whose head has no GPU (as KubeRay and the launcher set it up): model actors,
drivers and writers on the GPU worker; the autoscaler asked for the plan's GPUs and the request cleared
however the run ends; candidate thumbnails made where the candidates are rendered."""

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
from cosed.runner import resolve_run

from conftest import write_jsonl

pytestmark = pytest.mark.slow

TASKS = [{"id": "tea", "title": "Tea", "steps": ["Boil water.", "Steep the leaves."]},
         {"id": "toast", "title": "Toast", "steps": ["Slice the bread.", "Toast it."]}]


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    worker = cluster.add_node(num_cpus=4, num_gpus=4)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_writers_and_drivers_run_on_the_gpu_worker_and_the_autoscaler_request_is_cleared(cluster, tmp_path,
                                                                                       tiny_config, monkeypatch):
    _, worker = cluster
    asked = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda bundles=None, **_: asked.append(bundles))
    monkeypatch.setenv("COSED_AUTOSCALE_MAX_GPUS", "6")
    cfg = dataclasses.replace(tiny_config, save_candidates=True,
                              ray=dataclasses.replace(tiny_config.ray, gpu_wait_s=5.0))  # the 6 never come
    summary = run_on_ray(str(write_jsonl(tmp_path / "t.jsonl", TASKS)), str(tmp_path / "out"), cfg, progress=False)
    assert sorted(summary.done) == ["tea", "toast"]
    assert summary.extra["writer_nodes"] == [worker.node_id]  # off the head, which has no GPU
    assert {a["node_id"] for a in summary.actors} == {worker.node_id}
    # It asked for the GPUs its plan can use (up to the cluster's 6), then cleared the request.
    assert asked[0] and all(bundle == {"GPU": 1.0} for bundle in asked[0]) and len(asked[0]) <= 6
    assert asked[-1] == []
    # The kept candidates are thumbnails (what the text-to-image actor made), not the full images.
    shown = [Image.open(p).size for p in (tmp_path / "out" / "tea" / "candidates").rglob("*.png")]
    assert len(shown) == 4 + 4  # step 1: four fresh seeds; step 2: three pooled and one fresh


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
