"""Where model work runs. The engine only talks to a `Backend`, one method per model call.

Each method takes the call's request value (`cosed.calls`). `LocalBackend` runs
every model in this process; the Ray backend in `cosed.distributed` sends the
same values to model actors, whose `ModelWorker` runs them on a `LocalBackend`,
so both paths run the same code and give the same bytes. `fetch` turns an
image handle into pixels (identity here, an object-store read on Ray).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Protocol

import numpy as np

from cosed import determinism
from cosed import storage
from cosed.calls import (CaptionRequest, Captioned, ClipDone, ClipRequest, EmbedImages, EmbedTexts, EncodeScene,
                         Rendered, RenderRequest, Score, TalcRequest, TextClipRequest)
from cosed.config import RunConfig, SDConfig
from cosed.embed import ClipEmbedder
from cosed.generate import encode_scene, latent_shape, render_batch
from cosed.images import png_bytes, thumbnail_png
from cosed.memory import LEVELS, MemoryPlan, actor_memory_plan, gpu_memory_gib
from cosed.models.loaders import load_pipeline, resolve_device
from cosed.models.profiles import KINDS, Profile
from cosed.selector import ContrastiveSelector
from cosed.video import animate, encode_mp4, existing_clip, next_scene_image, scene_image, text_to_video, write_clip


class Backend(Protocol):
    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]: ...

    def render(self, requests: list[RenderRequest]) -> list[Rendered]: ...

    def encode_scene(self, request: EncodeScene) -> dict[int, np.ndarray]: ...

    def embed_texts(self, request: EmbedTexts) -> np.ndarray: ...

    def embed_images(self, request: EmbedImages) -> np.ndarray: ...

    def selector_scores(self, request: Score) -> np.ndarray: ...

    def animate(self, request: ClipRequest) -> ClipDone: ...

    def fetch(self, handle: Any) -> np.ndarray: ...


class LocalBackend:
    """All models in this process, each loaded on first use."""

    def __init__(self, profile: Profile, cfg: RunConfig, gpu_shared_by: tuple[str, ...] = KINDS):
        self.profile = profile
        self.cfg = cfg
        self.gpu_shared_by = gpu_shared_by
        self.device = resolve_device(cfg.device)
        # CPU float reductions depend on the thread count: fixing it keeps in-process runs and every Ray
        # actor bit-identical. On CUDA: the cheap determinism options (`cosed.determinism`).
        determinism.apply(self.device.type, cfg.cpu_threads)

    def memory_plan(self, kind: str) -> MemoryPlan:
        """The byte level the run plan gave this pool, plus CPU offload where this process's GPU, shared with
        the models placed beside it, cannot hold it otherwise (offload changes no byte; the byte savers are
        never chosen here, since every process of a pool must decode alike). A GPU too small even with
        offload fails the model's load with a message that says so."""
        level = self.cfg.memory_plan.get(kind, "plain")
        needs = {name: self.profile.memory_gib(name, self.gpu_shared_by) for name in LEVELS}
        return actor_memory_plan(level, needs, gpu_memory_gib(self.device), self.cfg.memory,
                                 what=f"profile {self.profile.name}")

    @cached_property
    def sd(self):
        return load_pipeline(self.profile.spec("sd"), "sd", self.device, self.memory_plan("sd"))

    @cached_property
    def video(self):
        return load_pipeline(self.profile.spec("video"), "video", self.device, self.memory_plan("video"))

    @cached_property
    def t2v(self):
        """The video model's text-to-video pipeline, on the same loaded components."""
        from cosed.models.adapters import text_to_video_pipeline

        return text_to_video_pipeline(self.video)

    @cached_property
    def clip(self) -> ClipEmbedder:
        return ClipEmbedder.load(self.profile.clip, self.device)

    @cached_property
    def selector(self) -> ContrastiveSelector:
        return ContrastiveSelector.from_path(self.cfg.selector)

    @cached_property
    def captioner(self):
        """The lm rewriter's caption model (`cosed.captioner`), loaded on first use."""
        from cosed.captioner import Captioner

        return Captioner(self.cfg.rewriter_model, device=self.device, cache_dir=self.cfg.cache_dir).load()

    def for_run(self, cfg: RunConfig) -> "LocalBackend":
        """A backend for another run config (another selector or mode) sharing the models loaded here."""
        other = LocalBackend(self.profile, cfg)
        shared = ("sd", "video", "keyframe_video", "clip")
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k in shared})
        return other

    def load_all(self) -> None:
        """Load every model now, so a missing one stops the run before any task starts."""
        self.sd, self.video, self.clip, self.selector  # noqa: B018

    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]:
        return latent_shape(self.sd, sd)

    def render(self, requests: list[RenderRequest]) -> list[Rendered]:
        return [self.render_one(request) for request in requests]

    def render_one(self, request: RenderRequest) -> Rendered:
        batch = render_batch(self.sd, request.caption, request.latents, request.sd, list(request.capture))
        thumbnails = [thumbnail_png(image, request.thumbnail_px) for image in batch.images] \
            if request.thumbnail_px else None
        return Rendered(images=list(batch.images), captured=batch.captured, thumbnails=thumbnails)

    def encode_scene(self, request: EncodeScene) -> dict[int, np.ndarray]:
        return encode_scene(self.sd, request.image, request.sd, list(request.capture), request.seed)

    def embed_texts(self, request: EmbedTexts) -> np.ndarray:
        return self.clip.texts(list(request.texts))

    def embed_images(self, request: EmbedImages) -> np.ndarray:
        return self.clip.images(list(request.images))

    def selector_scores(self, request: Score) -> np.ndarray:
        return self.selector.score(request.next_text, request.next_image, request.past_text, request.past_image,
                                   self.cfg.selector_mode)

    def animate(self, request: ClipRequest) -> ClipDone:
        found = existing_clip(request)
        if found:
            return found
        return write_clip(request, self.frames(scene_image(request), request))

    def text_to_video(self, request: TextClipRequest) -> ClipDone:
        """A scene's clip from its caption alone (the t2v method), stored where the request says."""
        size = storage.size(request.clip)
        if size is not None:
            return ClipDone(clip=request.clip, size=size, frames=0, reused=True)
        frames = text_to_video(self.t2v, request.caption, request.seed, request.video)
        data = encode_mp4(frames, request.video.fps)
        storage.write_bytes(request.clip, data)
        return ClipDone(clip=request.clip, size=len(data), frames=len(frames))

    def talc_video(self, request: TalcRequest) -> ClipDone:
        """The talc method's one generation for the task, split into scenes (first frame PNG + clip each)."""
        if all(storage.exists(uri) for uri in request.scenes + request.clips):
            return ClipDone(clip=request.clips[0], size=0, frames=0, reused=True)
        from cosed.talc import scene_frames, talc_frames

        frames = talc_frames(self.t2v, list(request.captions), request.seed, request.video)
        for span, scene, clip in zip(scene_frames(request.video.num_frames, len(request.captions)), request.scenes,
                                     request.clips):
            storage.write_bytes(scene, png_bytes(frames[span.start]))
            storage.write_bytes(clip, encode_mp4(frames[span.start:span.stop], request.video.fps))
        return ClipDone(clip=request.clips[0], size=0, frames=len(frames))

    def frames(self, image: np.ndarray, request: ClipRequest) -> np.ndarray:
        last = next_scene_image(request)  # keyframe transitions: the next scene ends this clip
        return animate(self.video, image, request.seed, request.video, request.caption, last=last,
                       keyed=None if last is None else self.keyframe_video)

    @cached_property
    def keyframe_video(self):
        """The video model's keyframe pipeline (`--transitions keyframe`), on the same loaded modules."""
        from cosed.models.adapters import image_to_video_adapter

        return image_to_video_adapter(self.video).keyframe_pipeline(self.video)

    def caption(self, request: CaptionRequest) -> Captioned:
        """Captions for a batch of pairs through the caption cache at ``request.cache``; ``generated`` counts
        the pairs the model made (the rest were in the cache)."""
        captioner = self.captioner
        captioner.use_cache(request.cache)
        before = captioner.generated
        captions = captioner.caption_pairs(list(request.pairs))
        return Captioned(tuple(captions), captioner.generated - before)

    def fetch(self, handle: Any) -> np.ndarray:
        return handle


def make_backend(profile: Profile, cfg: RunConfig, gpu_shared_by: tuple[str, ...] = KINDS):
    """The backend a profile asks for: its models in this process, or the latency simulator.

    A profile with ``"backend": "simulated"`` (``latency``) runs no model; see `cosed.simulate`.
    """
    if profile.backend == "simulated":
        from cosed.simulate import SimulatedBackend

        return SimulatedBackend(profile, cfg)
    return LocalBackend(profile, cfg, gpu_shared_by=gpu_shared_by)

