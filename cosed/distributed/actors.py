"""Ray actors and tasks: model workers pinned to GPUs, the directory, task drivers, writers.

Ownership and restarts (see README "Failure model"): the job process creates
every model worker (restartable, stateless between calls) and the directory
(restartable; the job republishes its contents); drivers only sequence a task
and hand its clip refs to a writer task, which is stateless and retried by Ray.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from functools import lru_cache

import numpy as np
import ray

from cosed.backend import make_backend
from cosed.config import RunConfig
from cosed.distributed import telemetry
from cosed.distributed.dispatch import CallPolicy, Dispatcher, Membership, QueueCounter
from cosed.distributed.sizing import KINDS
from cosed.engine import SequenceResult, png_bytes, sequence_task, write_task_outputs
from cosed.models.profiles import Profile, resolve_profile
from cosed.storyboard import storyboard_png
from cosed.tasks import Task
from cosed.video import concat_mp4, encode_clip


def first_to_create(marker: str | None) -> bool:
    """Test-only fault injection: True for the one process, cluster-wide, that creates ``marker``."""
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class ModelWorker:
    """One model kind in one actor: loads once, then serves calls; counts its busy time.

    It wraps the same `LocalBackend` methods the in-process path calls, so the
    numbers cannot drift between the two paths. `info` runs in its own thread
    (the "control" group), so the job can see a call that hangs.
    """

    def __init__(self, kind: str, cfg: RunConfig):
        self.kind = kind
        self.cfg = cfg
        profile = resolve_profile(cfg.profile, cfg.cache_dir)
        whole_gpu = ray.get_runtime_context().get_assigned_resources().get("GPU", 0) >= 1
        self.backend = make_backend(profile, cfg, gpu_shared_by=(kind,) if whole_gpu else KINDS)
        getattr(self.backend, kind)  # load now: a model that cannot load fails the pool's start
        if kind == "clip":
            self.backend.selector  # noqa: B018
        self.busy = 0.0
        self.calls = 0
        self.queue = QueueCounter()
        self.started = time.time()
        self.running_since: float | None = None

    def _timed(self, method: str, *args):
        self._maybe_stall()
        start = time.perf_counter()
        self.running_since = time.time()
        try:
            return getattr(self.backend, method)(*args)
        finally:
            seconds = time.perf_counter() - start
            self.running_since = None
            self.busy += seconds
            self.calls += 1
            self.queue.finish()
            telemetry.record("cosed_pool_busy_seconds", seconds, pool=self.kind)

    def _maybe_stall(self) -> None:
        """Test-only fault injection (RayConfig.chaos_stall_*): hang once, cluster-wide."""
        if self.cfg.ray.chaos_stall_kind == self.kind and first_to_create(self.cfg.ray.chaos_stall_marker):
            self.running_since = time.time()
            threading.Event().wait()

    def latent_shape(self, sd):
        self.queue.finish()
        return self.backend.latent_shape(sd)

    def render(self, caption, latents, sd, capture_iterations):
        return self._timed("render_many", caption, [latents], sd, capture_iterations)[0]

    def embed_texts(self, texts):
        return self._timed("embed_texts", texts)

    def embed_images(self, images):
        return self._timed("embed_images", images)

    def selector_scores(self, *embeddings):
        return self._timed("selector_scores", *embeddings)

    def animate(self, image, seed, video, prompt=None):
        return self._timed("animate", image, seed, video, prompt)

    def animate_clip(self, image, seed, video, prompt=None):
        """The clip encoded to H.264 at once: raw frames never leave this process."""
        frames = self.animate(image, seed, video, prompt)
        return encode_clip(frames, video.fps)

    @ray.method(concurrency_group="control")
    def claim(self) -> None:
        self.queue.claim()

    @ray.method(concurrency_group="control")
    def queued(self) -> int:
        return self.queue.queued

    def drain(self) -> bool:
        """Returns once every call queued before it has run (used before removing this actor)."""
        return True

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        context = ray.get_runtime_context()
        return {"kind": self.kind, "name": context.get_actor_name(),
                "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
                "node_id": context.get_node_id(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "busy": self.busy, "calls": self.calls, "alive": time.time() - self.started,
                "running_for": time.time() - self.running_since if self.running_since else 0.0}


RemoteModelWorker = ray.remote(concurrency_groups={"control": 1})(ModelWorker)


@ray.remote(num_cpus=0, max_restarts=-1)
class Directory:
    """Where drivers and writers look up pool members; the job republishes it after a restart."""

    def __init__(self):
        self.membership: Membership | None = None

    def publish(self, membership: Membership) -> None:
        self.membership = membership

    def get(self) -> Membership | None:
        return self.membership


class RayBackend:
    """The `Backend` the engine sees inside a driver: each call goes through the dispatcher."""

    # A latent shape is asked of the SD pool once per run and process, not once per task (the call
    # waits behind every queued render). Keyed by the run that published the pools and the SD config.
    _shapes: dict[tuple[str, str], tuple] = {}

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    def latent_shape(self, sd):
        key = (self.dispatcher.membership.run_id, repr(sd))
        if key not in self._shapes:
            self._shapes[key] = tuple(self.dispatcher.call("sd", "latent_shape", sd))
        return self._shapes[key]

    def render_many(self, caption, latent_batches, sd, capture_iterations):
        return self.dispatcher.call_many("sd", "render", [(caption, batch, sd, capture_iterations)
                                                          for batch in latent_batches])

    def embed_texts(self, texts):
        return self.dispatcher.call("clip", "embed_texts", texts)

    def embed_images(self, images):
        return self.dispatcher.call("clip", "embed_images", images)

    def selector_scores(self, next_text, next_image, past_text, past_image):
        return self.dispatcher.call("clip", "selector_scores", next_text, next_image, past_text, past_image)

    def animate_clip_async(self, image, seed, video, prompt=None):
        return self.dispatcher.submit("video", "animate_clip", image, seed, video, prompt)[0]

    def animate(self, image, seed, video, prompt=None):
        return self.dispatcher.call("video", "animate", image, seed, video, prompt)


@ray.remote(num_cpus=0, max_concurrency=2)
class TaskDriver:
    """Walks one task's steps in order; sends each chosen scene to the video pool at once.

    It returns as soon as the last scene is chosen, with the clip refs still
    rendering (in both returns: the job watches them, the writer reads them), so
    this slot can start the next task.
    `progress` runs beside `run` and tells the job how many scenes are chosen.
    """

    def __init__(self):
        self.scenes = 0

    def progress(self) -> int:
        return self.scenes

    def run(self, task: Task, captions: list[str], cfg: RunConfig, membership: Membership, directory,
            policy: CallPolicy) -> tuple[dict, dict]:
        self.scenes = 0
        backend = RayBackend(Dispatcher(membership, policy, directory, seed=hash(task.id) % 997))
        clips = []

        def stream(step):
            clips.append(backend.animate_clip_async(step.image, step.video_seed, cfg.video, step.caption))

        def count(_number):
            self.scenes += 1
            telemetry.record("cosed_scenes_done")

        result = sequence_task(task, captions, backend, cfg, on_scene=stream, on_step=count)
        return {"scenes": len(result.steps), "clips": clips}, {"result": result, "clips": clips}


@lru_cache(maxsize=1)
def _warm_writer() -> None:
    """Load what writing imports lazily (codecs, fonts) once per process, so the traced peak is the task's."""
    still = np.zeros((16, 16, 3), np.uint8)
    png_bytes(still)
    storyboard_png("warm", [still], ["warm"], ["fresh"])
    concat_mp4([encode_clip(np.zeros((2, 16, 16, 3), np.uint8), 7).data])


@ray.remote(num_cpus=0)
def warm_writer_process() -> int:
    """Start (and warm) one worker process for writers before the run, so no task waits for one."""
    _warm_writer()
    return os.getpid()


@ray.remote(num_cpus=0)
def write_task(out: str, sequenced: dict, profile: Profile, cfg: RunConfig, membership: Membership, directory,
               policy: CallPolicy, start: float) -> dict:
    """Wait for a task's encoded clips (re-animating any that were lost) and write the task.

    Stateless: Ray re-runs it if its process dies; the outputs are the same
    because every clip is a function of its image and seed.
    """
    result: SequenceResult = sequenced["result"]
    dispatcher = Dispatcher(membership, policy, directory, seed=hash(result.task.id) % 997)
    _warm_writer()
    tracemalloc.start()  # the peak it reports is the memory bound the README states and a test checks
    try:
        with result.timer.phase("video"):
            clips = dispatcher.call_many("video", "animate_clip",
                                         [(s.image, s.video_seed, cfg.video) for s in result.steps],
                                         submitted=sequenced["clips"])
        # Ray's wait machinery allocates a fixed transient buffer (~1 MiB) here, whatever the task;
        # from now on the peak counts what this task holds: its clips (still traced) and the writing.
        tracemalloc.reset_peak()
        if first_to_create(cfg.ray.chaos_writer_exit_marker):
            os._exit(1)
        write_task_outputs(out, result, clips, profile, cfg, {"total": round(time.time() - start, 4)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"task_id": result.task.id, "peak_bytes": peak, "clip_bytes": sum(len(c.data) for c in clips)}
