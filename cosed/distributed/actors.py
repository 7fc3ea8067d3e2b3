"""Ray actors and tasks: model workers pinned to GPUs, task drivers, writers, the GPU probe.

Ownership (README "Failure model"): the job process creates every model worker
and owns every clip call; a driver only sequences one task at a time (its calls
to the text-to-image and CLIP pools are its own, so its death costs only that
task) and stores what it chose; a writer assembles a task from storage. No
result lives only in a process that serves other tasks.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
import tracemalloc
import traceback
import uuid
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import ray

from cosed import storage
from cosed.backend import make_backend
from cosed.calls import EmbedImages, Rendered
from cosed.config import RunConfig
from cosed.distributed import telemetry
from cosed.distributed.core import ClipFound, DriverFailed, Sequenced
from cosed.distributed.dispatch import (CallFailed, CallPolicy, Dispatcher, Membership, ObjectsLost, QueueCounter,
                                       get_or_lost)
from cosed.distributed.policies import LENDS
from cosed.engine import assemble_task, sequence_task, stored_sequence
from cosed.images import png_bytes
from cosed.lease import LeaseFence
from cosed.models.profiles import Profile, resolve_profile
from cosed.parts import TaskParts
from cosed.storage import StorageUnavailable
from cosed.storyboard import storyboard_png
from cosed.tasks import Task
from cosed.video import concat_mp4, encode_mp4, existing_clip


def first_to_create(marker: str | None) -> bool:
    """Test-only fault injection: True for the one process, cluster-wide, that creates ``marker``."""
    if not marker:
        return False
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


MODEL_OF = {"caption": "captioner"}  # the backend attribute that holds a pool's model, where it differs


class Batcher:
    """Concurrent calls of many drivers run as one model call (CLIP embeddings).

    The first caller leads: it runs everything pending as one call of ``fn`` and hands
    each caller its rows, until nothing is pending; calls that arrive while a batch runs
    make the next batch. So a lone call never waits, and under load calls merge.
    ``fn`` must give each row the same bytes whatever shares its call (the CLIP
    embedder's fixed-size chunks do).
    """

    def __init__(self, fn, wait_s: float = 0.0):
        self.fn = fn
        self.wait_s = wait_s
        self.lock = threading.Lock()
        self.pending: list[dict] = []
        self.leading = False
        self.batches = 0

    def __call__(self, items: list) -> np.ndarray:
        slot = {"items": items, "done": threading.Event()}
        with self.lock:
            self.pending.append(slot)
            lead = not self.leading
            self.leading = self.leading or lead
        if lead:
            if self.wait_s:
                time.sleep(self.wait_s)
            while True:
                with self.lock:
                    batch, self.pending = self.pending, []
                    if not batch:
                        self.leading = False
                        break
                self._run(batch)
        slot["done"].wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def _run(self, batch: list[dict]) -> None:
        self.batches += 1
        try:
            rows = self.fn([item for slot in batch for item in slot["items"]])
        except Exception as exc:  # every caller of this batch sees the error
            for slot in batch:
                slot["error"] = exc
                slot["done"].set()
            return
        start = 0
        for slot in batch:
            slot["result"] = rows[start:start + len(slot["items"])]
            start += len(slot["items"])
            slot["done"].set()


class ModelWorker:
    """One model kind in one actor: loads once, then runs calls (`cosed.calls` requests); counts its work.

    It runs the same `LocalBackend` methods the in-process path calls, so the
    numbers cannot drift between the two paths. Control methods (claims, queue
    probes, `info`) run on a thread of their own, so they answer while a call runs.
    """

    def __init__(self, kind: str, cfg: RunConfig, gpu_shared_by: tuple[str, ...]):
        if first_to_create(cfg.ray.chaos_start_failure_marker):
            raise RuntimeError("injected start failure (ray.chaos_start_failure_marker)")
        self.kind = kind
        self.cfg = cfg
        profile = resolve_profile(cfg.profile, cfg.cache_dir)
        self.backend = make_backend(profile, cfg, gpu_shared_by=gpu_shared_by)
        getattr(self.backend, MODEL_OF.get(kind, kind))  # load now: a model that cannot load fails this start
        if LENDS.get(kind) in gpu_shared_by:  # placement shared: the video model beside SD, for late clips
            getattr(self.backend, LENDS[kind])
        if kind == "clip":
            self.backend.selector  # noqa: B018
            self.embed_images = Batcher(lambda images: self.backend.embed_images(EmbedImages(tuple(images))))
        self.busy = 0.0  # seconds during which at least one call ran (calls batched together overlap)
        self.calls = 0
        self.methods: dict[str, int] = {}  # calls per method (an SD actor lent to video makes clips)
        self.active = 0
        self.active_since = 0.0
        self.counters = threading.Lock()
        self.queue = QueueCounter(ttl_s=max(600.0, 3 * cfg.ray.call_timeout_floor_s))
        self.life = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.running: dict[str, float] = {}  # call id -> when it started (a hung call shows here)

    def run(self, call_id: str, method: str, request):
        self.queue.start(call_id)
        if method == "latent_shape":  # a question about the model, not model work: not counted as a call
            try:
                return self.backend.latent_shape(request)
            finally:
                self.queue.finish()
        self._began(call_id)
        try:
            self._maybe_stall()
            if self.backend.device.type == "cpu":
                import torch

                torch.set_num_threads(self.cfg.cpu_threads)  # per thread under OpenMP: this call's thread too
            return self._execute(method, request)
        finally:
            self._ended(call_id, method)
            self.queue.finish()

    def _began(self, call_id: str) -> None:
        with self.counters:
            if not self.active:
                self.active_since = time.perf_counter()
            self.active += 1
            self.running[call_id] = time.time()

    def _ended(self, call_id: str, method: str) -> None:
        with self.counters:
            self.active -= 1
            self.calls += 1
            self.methods[method] = self.methods.get(method, 0) + 1
            self.running.pop(call_id, None)
            if not self.active:
                seconds = time.perf_counter() - self.active_since
                self.busy += seconds
                telemetry.record("cosed_pool_busy_seconds", seconds, pool=self.kind)

    def _execute(self, method: str, request):
        if method == "render":
            rendered: Rendered = self.backend.render_one(request)
            return (*rendered.images, (rendered.captured, rendered.thumbnails))  # one object per image
        if method == "embed_images":
            refs = [i for i, h in enumerate(request.images) if isinstance(h, ray.ObjectRef)]
            images = list(request.images)
            for i, image in zip(refs, ray.get([images[i] for i in refs])):  # one fetch for all of them
                images[i] = image
            return self.embed_images(images) if self.kind == "clip" else self.backend.embed_images(
                EmbedImages(tuple(images)))
        return getattr(self.backend, method)(request)

    def _maybe_stall(self) -> None:
        """Test-only fault injection (RayConfig.chaos_stall_*: hang once, cluster-wide; chaos_slow_*: every
        call of this pool's own actors slower)."""
        if self.cfg.ray.chaos_stall_kind == self.kind and first_to_create(self.cfg.ray.chaos_stall_marker):
            threading.Event().wait()
        if self.cfg.ray.chaos_slow_kind == self.kind:
            time.sleep(self.cfg.ray.chaos_slow_s)

    @ray.method(concurrency_group="control")
    def claim(self, call_id: str) -> None:
        self.queue.claim(call_id)

    @ray.method(concurrency_group="control")
    def release(self, call_id: str) -> None:
        self.queue.release(call_id)

    @ray.method(concurrency_group="control")
    def queued(self) -> int:
        return self.queue.queued

    def drain(self) -> bool:
        """Returns once every call queued before it has run (used before removing this actor)."""
        return True

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        context = ray.get_runtime_context()
        return {"kind": self.kind, "name": context.get_actor_name(), "life": self.life,
                "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
                "node_id": context.get_node_id(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "busy": self.busy, "calls": self.calls, "methods": dict(self.methods),
                "alive": time.time() - self.started,
                "queued": self.queue.queued, "running_for": self._running_for(),
                **({"generate_calls": self.backend.captioner.generate_calls,
                    "generated": self.backend.captioner.generated} if self.kind == "caption" else {})}

    def _running_for(self) -> float:
        with self.counters:
            return time.time() - min(self.running.values(), default=time.time())


class BatchingWorker(ModelWorker):
    """CLIP and the selector: many drivers' calls run at once, so that their embeddings are batched."""

    @ray.method(concurrency_group="batch")
    def run(self, call_id: str, method: str, request):
        return super().run(call_id, method, request)


RemoteModelWorker = ray.remote(concurrency_groups={"control": 1})(ModelWorker)
RemoteBatchingWorker = ray.remote(concurrency_groups={"control": 1, "batch": 16})(BatchingWorker)


def remote_worker(kind: str):
    return RemoteBatchingWorker if kind == "clip" else RemoteModelWorker


class RayBackend:
    """The `Backend` the engine sees inside a driver: each call goes through the dispatcher."""

    # A latent shape is asked of the SD pool once per run and process, not once per task (the call
    # waits behind every queued render). Keyed by the run that made the pools and the SD config.
    _shapes: dict[tuple[str, str], tuple] = {}

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher

    def latent_shape(self, sd):
        key = (self.dispatcher.membership.run_id, repr(sd))
        if key not in self._shapes:
            self._shapes[key] = tuple(self.dispatcher.call("sd", "latent_shape", sd))
        return self._shapes[key]

    def render(self, requests):
        out = []
        for image_refs, (captured, thumbnails) in self.dispatcher.call_many(
                "sd", "render", requests, num_returns=lambda request: request.size + 1):
            out.append(Rendered(images=list(image_refs), captured=captured, thumbnails=thumbnails))
        return out

    def encode_scene(self, request):
        return self.dispatcher.call("sd", "encode_scene", request)

    def embed_texts(self, request):
        return self.dispatcher.call("clip", "embed_texts", request)

    def embed_images(self, request):
        return self.dispatcher.call("clip", "embed_images", request)

    def selector_scores(self, request):
        return self.dispatcher.call("clip", "selector_scores", request)

    def animate(self, request, timeout_s: float = 3600.0, poll_s: float = 0.2):
        """Clip calls are sent by the job, not by drivers: a driver that needs a clip (the mora method) waits
        until the job has stored it."""
        deadline = time.monotonic() + timeout_s
        while (found := existing_clip(request)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"clip of task {request.task_id} step {request.step} not stored in {timeout_s:g} s")
            time.sleep(poll_s)
        return found

    def text_to_video(self, request):
        """The t2v method's clip: a call of the video pool (its model takes text alone)."""
        return self.dispatcher.call("video", "text_to_video", request)

    def talc_video(self, request):
        """The talc method's one generation for a task: a call of the video pool."""
        return self.dispatcher.call("video", "talc_video", request)

    def fetch(self, handle):
        return get_or_lost(handle, "the chosen candidate")


@dataclass(frozen=True)
class DriverTask:
    """What a driver needs for one task attempt."""

    key: tuple[str, int]
    task: Task
    captions: list[str]
    fingerprint: str
    out: str
    cfg: RunConfig
    policy: CallPolicy


# Drivers and writers get their CPUs, memory, worker resource and node from the job (`RayJob._placement`,
# `policies.host_nodes` / `process_resources`); the 0 CPUs here are only the defaults that every call overrides.
@ray.remote(num_cpus=0, max_concurrency=4)
class TaskDriver:
    """Walks one task's steps in order; reports each chosen scene to the job as it is chosen.

    `start` begins a task in a thread of its own and returns; the job keeps one
    `next_events` call waiting, which answers with whatever happened since (a
    scene's `ClipRequest`, `ClipFound`, and finally `Sequenced` or `DriverFailed`),
    each as ``(task key, event)``: the job credits an event to the attempt that made it.
    `update` takes the pools' new members when they change.
    """

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.membership: Membership | None = None
        self.dispatcher: Dispatcher | None = None
        self.known = threading.Condition()
        self.tasks = 0

    def update(self, membership: Membership) -> None:
        with self.known:
            if self.membership is None or membership.version >= self.membership.version:
                self.membership = membership
            if self.dispatcher is not None:
                self.dispatcher.update(membership)
            self.known.notify_all()

    def start(self, job: DriverTask) -> None:
        with self.known:  # calls of a threaded actor may run out of order: the first members may still come
            if not self.known.wait_for(lambda: self.membership is not None, timeout=job.policy.restart_wait_s):
                self.events.put((job.key, DriverFailed("calls", "the driver was given no pool members")))
                return
            self.dispatcher = Dispatcher(self.membership, job.policy, seed=hash(job.task.id) % 997)
        threading.Thread(target=self._run, args=(job, self.dispatcher), daemon=True).start()

    def ready(self) -> int:
        """Answers once the process is up (the job waits for every driver before the first task)."""
        return os.getpid()

    def next_events(self) -> list:
        events = [self.events.get()]
        while not self.events.empty():
            events.append(self.events.get_nowait())
        return events

    def _run(self, job: DriverTask, dispatcher: Dispatcher) -> None:
        self.tasks += 1
        emit = lambda event: self.events.put((job.key, event))  # noqa: E731
        storage.configure(job.cfg.storage.retry_seconds, job.cfg.storage.throttle_seconds)
        parts = TaskParts.of(job.out, job.task.folder, job.fingerprint)
        try:
            stored = stored_sequence(job.task, job.cfg, parts)
            if stored is not None:  # sequenced before (a retry or a resume): its scenes are stored
                for request in stored:
                    emit(ClipFound(request) if existing_clip(request) else request)
                    telemetry.record("cosed_scenes_done")
                emit(Sequenced(len(stored), _counts(dispatcher)))
                return

            def scene(request) -> None:  # a step stored by an earlier attempt may have its clip too
                emit(ClipFound(request) if existing_clip(request) else request)
                telemetry.record("cosed_scenes_done")
                if self.tasks == 2 and first_to_create(job.cfg.ray.chaos_driver_exit_marker):
                    time.sleep(0.5)  # the scene reaches the job before this process goes
                    os._exit(1)

            sequence_task(job.task, job.captions, RayBackend(dispatcher), job.cfg, parts, on_scene=scene)
            emit(Sequenced(len(job.task.steps), _counts(dispatcher)))
        except StorageUnavailable as exc:
            emit(DriverFailed("storage", str(exc)))
        except CallFailed as exc:
            emit(DriverFailed("calls", str(exc)))
        except ObjectsLost as exc:  # the core retries the task, which resumes at this step
            emit(DriverFailed("lost", str(exc)))
        except Exception as exc:  # a bad task fails alone
            emit(DriverFailed("error", f"{type(exc).__name__}: {exc}"))
            traceback.print_exc()


def _counts(dispatcher: Dispatcher) -> tuple[int, int, int, int]:
    probes = dispatcher.probes
    return (probes.calls, probes.probes, probes.claims, probes.releases)


@lru_cache(maxsize=1)
def _warm_writer() -> None:
    """Load what writing imports lazily (codecs, fonts) once per process, so the traced peak is the task's."""
    still = np.zeros((16, 16, 3), np.uint8)
    png_bytes(still)
    storyboard_png("warm", [still], ["warm"], ["fresh"])
    concat_mp4([encode_mp4(np.zeros((2, 16, 16, 3), np.uint8), 7)])


@ray.remote(num_cpus=0)
def warm_writer() -> str:
    """Start (and warm) a worker process for writers before the run, on the node given: no task waits
    seconds for a process start at its end."""
    _warm_writer()
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
def write_task(out: str, task: Task, fingerprint: str, profile: Profile, cfg: RunConfig, fence: LeaseFence | None,
               started_wall: float) -> dict:
    """Assemble a task from its stored parts and write it, manifest last.

    Stateless: Ray runs it again if its process dies; the outputs are the same
    because every part is stored under the task's fingerprint.
    """
    _warm_writer()
    tracemalloc.start()  # the peak it reports is the memory bound the README states and a test checks
    try:
        if first_to_create(cfg.ray.chaos_writer_exit_marker):
            os._exit(1)
        assemble_task(out, task, fingerprint, profile, cfg, fence,
                      extra_timings={"total": round(time.time() - started_wall, 4)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"task_id": task.id, "peak_bytes": peak, "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote(num_cpus=0)
def node_gpu_memory() -> list[float]:
    """GiB of each GPU on this node (nvidia-smi; nothing on a node without NVIDIA GPUs)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [float(line) / 1024 for line in out.split() if line.strip().replace(".", "", 1).isdigit()]
