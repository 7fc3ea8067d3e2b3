"""Ray actors: model workers pinned to GPUs, the pool registry, the task driver, the stitcher."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections import defaultdict

import numpy as np
import ray

from cosed.backend import make_backend
from cosed.config import RunConfig
from cosed.distributed.costs import CostModel
from cosed.distributed.sizing import KINDS, ClusterPlan, PoolPlan, nodes_from_ray, plan_for_cluster, plan_pools
from cosed.engine import SequenceResult, sequence_task, write_task_outputs
from cosed.models.profiles import Profile, resolve_profile
from cosed.tasks import Task

WORKER_RESTARTS = 3


class ModelWorker:
    """One model kind in one actor: loads once, then serves batches; counts its busy time.

    It wraps the same `LocalBackend` methods the in-process path calls, so the
    numbers cannot drift between the two paths.
    """

    def __init__(self, kind: str, cfg: RunConfig):
        self.kind = kind
        profile = resolve_profile(cfg.profile, cfg.cache_dir)
        self.backend = make_backend(profile, cfg)
        getattr(self.backend, kind)  # load now: a model that cannot load fails the pool's start
        if kind == "clip":
            self.backend.selector  # noqa: B018
        self.busy = 0.0
        self.calls = 0
        self.started = time.time()

    def _timed(self, method: str, *args):
        start = time.perf_counter()
        try:
            return getattr(self.backend, method)(*args)
        finally:
            self.busy += time.perf_counter() - start
            self.calls += 1

    def latent_shape(self, sd):
        return self.backend.latent_shape(sd)

    def render(self, caption, latents, sd, capture_iterations):
        return self._timed("render_many", caption, [latents], sd, capture_iterations)[0]

    def embed_texts(self, texts):
        return self._timed("embed_texts", texts)

    def embed_images(self, images):
        return self._timed("embed_images", images)

    def selector_scores(self, *embeddings):
        return self._timed("selector_scores", *embeddings)

    def animate(self, image, seed, video):
        return self._timed("animate", image, seed, video)

    def info(self) -> dict:
        context = ray.get_runtime_context()
        return {"kind": self.kind, "name": context.get_actor_name(), "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
                "node_id": context.get_node_id(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "busy": self.busy, "calls": self.calls, "alive": time.time() - self.started}


@ray.remote(num_cpus=0)
class ModelPools:
    """Registry of model actors by kind; grows a pool when the cluster gains resources."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_id = uuid.uuid4().hex[:8]
        self.handles: dict[str, list] = {kind: [] for kind in KINDS}
        self.plan: dict[str, PoolPlan] = {}
        self.cluster_plan: ClusterPlan | None = None
        self.costs = CostModel.from_dict({})
        self.work: dict[str, float] = {}
        self.drivers_hint: float | None = None

    def _cluster(self) -> tuple[float, float]:
        resources = ray.cluster_resources()
        return resources.get("GPU", 0.0), resources.get("CPU", 0.0)

    def start(self, costs: CostModel | None = None, work: dict[str, float] | None = None,
              drivers_hint: float | None = None) -> dict[str, dict]:
        """Create every pool and wait until each model has loaded (so a bad model fails here)."""
        self.costs, self.work, self.drivers_hint = costs or self.costs, work or {}, drivers_hint
        self._plan(wait=True)
        gpus, cpus = self._cluster()
        self._fill()
        refs = [h.info.remote() for hs in self.handles.values() for h in hs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.ray.start_timeout_s)
        if len(ready) < len(refs):
            raise TimeoutError(
                f"{len(refs) - len(ready)} model actors were not placed within {self.cfg.ray.start_timeout_s:.0f} s "
                f"on a cluster of {cpus:g} CPUs and {gpus:g} GPUs; pools asked for "
                + ", ".join(f"{k}: {p.replicas} x ({p.num_cpus:g} CPU, {p.num_gpus:g} GPU)" for k, p in self.plan.items()))
        ray.get(ready)
        return self.describe()

    def rescale(self) -> dict[str, dict]:
        """Add actors where the cluster now holds room for more; never removes any."""
        self._plan(wait=False)
        self._fill()
        return self.describe()

    def _plan(self, wait: bool) -> None:
        """The cost-aware plan on the nodes there now (at start: once the expected GPUs are in)."""
        if self.cfg.ray.policy == "legacy" and self.plan:
            fixed = {kind: plan.num_gpus for kind, plan in self.plan.items()}
            self.plan = plan_pools(self.cfg.ray, *self._cluster(), fixed_gpus=fixed)
            return
        self.cluster_plan = plan_for_cluster(self.cfg.ray, lambda: nodes_from_ray(ray.nodes()), self.work,
                                             self.costs, self.drivers_hint, wait=wait)
        self.plan = self.cluster_plan.pools

    def get_plan(self) -> ClusterPlan | None:
        return self.cluster_plan

    def _fill(self) -> None:
        for kind, plan in self.plan.items():
            while len(self.handles[kind]) < plan.replicas:
                actor = ray.remote(ModelWorker).options(
                    name=f"cosed-{self.run_id}-{kind}-{len(self.handles[kind])}",
                    num_gpus=plan.num_gpus, num_cpus=plan.num_cpus,
                    max_restarts=WORKER_RESTARTS, max_task_retries=WORKER_RESTARTS,
                ).remote(kind, self.cfg)
                self.handles[kind].append(actor)

    def get(self, kind: str) -> list:
        return list(self.handles[kind])

    def describe(self) -> dict[str, dict]:
        return {kind: {"replicas": len(self.handles[kind]), "num_gpus": plan.num_gpus}
                for kind, plan in self.plan.items()}

    def stats(self) -> list[dict]:
        """Per-actor info (GPU ids, node, busy seconds), skipping actors still loading."""
        refs = [h.info.remote() for hs in self.handles.values() for h in hs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=30)
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayError:
                continue
        return out


class RayBackend:
    """The `Backend` the engine sees inside a driver: each call goes to a model actor."""

    def __init__(self, pools, start: int = 0):
        self.pools = pools
        self.turn = itertools.count(start)
        self._shape = None

    def _next(self, kind: str):
        handles = ray.get(self.pools.get.remote(kind))
        return handles[next(self.turn) % len(handles)]

    def latent_shape(self, sd):
        if self._shape is None:
            self._shape = ray.get(self._next("sd").latent_shape.remote(sd))
        return self._shape

    def render_many(self, caption, latent_batches, sd, capture_iterations):
        handles = ray.get(self.pools.get.remote("sd"))
        offset = next(self.turn)
        return ray.get([handles[(offset + i) % len(handles)].render.remote(caption, batch, sd, capture_iterations)
                        for i, batch in enumerate(latent_batches)])

    def embed_texts(self, texts):
        return ray.get(self._next("clip").embed_texts.remote(texts))

    def embed_images(self, images):
        return ray.get(self._next("clip").embed_images.remote(images))

    def selector_scores(self, next_text, next_image, past_text, past_image):
        return ray.get(self._next("clip").selector_scores.remote(next_text, next_image, past_text, past_image))

    def animate_async(self, image, seed, video):
        return self._next("video").animate.remote(image, seed, video)

    def animate(self, image, seed, video):
        return ray.get(self.animate_async(image, seed, video))


@ray.remote(num_cpus=0)
class TaskDriver:
    """Walks one task's steps in order; hands each chosen scene to the video pool at once.

    Step i+1's candidates are generated while step i's clip renders; the
    stitcher receives the clips as they finish and writes the task.
    """

    def run(self, task: Task, captions: list[str], attempt: int, out: str, profile: Profile,
            cfg: RunConfig, pools, stitcher) -> dict:
        start = time.time()
        key = f"{task.id}#{attempt}"
        backend = RayBackend(pools, start=abs(hash(task.id)) % 997)

        def stream(step):
            clip = backend.animate_async(step.image, step.video_seed, cfg.video)
            stitcher.add_clip.remote(key, step.number, [clip])

        result = sequence_task(task, captions, backend, cfg, on_scene=stream)
        return ray.get(stitcher.finish.remote(key, out, result, profile, cfg, start))


@ray.remote(num_cpus=0)
class Stitcher:
    """Collects clips in any order; writes a task (manifest last) once its last clip is in."""

    def __init__(self):
        self.slots: dict[str, dict[int, asyncio.Future]] = defaultdict(dict)

    def _slot(self, key: str, step: int) -> asyncio.Future:
        return self.slots[key].setdefault(step, asyncio.get_running_loop().create_future())

    async def add_clip(self, key: str, step: int, clip_ref: list) -> None:
        slot = self._slot(key, step)
        try:
            slot.set_result(np.asarray(await clip_ref[0]))
        except Exception as exc:  # the driver's finish() re-raises it for this task
            slot.set_exception(exc)

    async def finish(self, key: str, out: str, result: SequenceResult, profile: Profile, cfg: RunConfig,
                     start: float) -> dict:
        with result.timer.phase("video"):
            try:
                clips = [await self._slot(key, step.number) for step in result.steps]
            finally:
                self.slots.pop(key, None)
        timings = {"total": round(time.time() - start, 4)}
        return await asyncio.to_thread(write_task_outputs, out, result, clips, profile, cfg, timings)
