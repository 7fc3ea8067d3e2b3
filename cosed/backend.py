"""Where model work runs. The engine only talks to a `Backend`.

`LocalBackend` runs every model in this process; the Ray backend in
`cosed.distributed` sends the same calls to model actors. Both call the same
core functions, so their outputs match byte for byte.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from cosed.config import RunConfig, SDConfig, VideoConfig
from cosed.generate import RenderedBatch, latent_shape, render_batch
from cosed.memory import LEVELS, SMALL_DECODE_CHUNK, MemoryPlan, gpu_memory_gib, plan_memory
from cosed.models.loaders import load_pipeline, resolve_device
from cosed.models.profiles import KINDS, Profile
from cosed.selector import ContrastiveSelector
from cosed.embed import ClipEmbedder
from cosed.video import animate


class Backend(Protocol):
    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]: ...

    def render_many(self, caption: str, latent_batches: list[np.ndarray], sd: SDConfig,
                    capture_iterations: list[int]) -> list[RenderedBatch]: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...

    def embed_images(self, images: np.ndarray) -> np.ndarray: ...

    def selector_scores(self, next_text: np.ndarray, next_image: np.ndarray,
                        past_text: np.ndarray, past_image: np.ndarray) -> np.ndarray: ...

    def animate(self, image: np.ndarray, seed: int, video: VideoConfig, prompt: str | None = None) -> np.ndarray: ...


def load_selector(path: str | None) -> ContrastiveSelector:
    return ContrastiveSelector.load(path) if path else ContrastiveSelector.untrained()


class LocalBackend:
    """All models in this process, each loaded on first use."""

    def __init__(self, profile: Profile, cfg: RunConfig, gpu_shared_by: tuple[str, ...] = KINDS):
        self.profile = profile
        self.cfg = cfg
        self.gpu_shared_by = gpu_shared_by
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            # CPU float reductions depend on the thread count: fixing it keeps
            # in-process runs and every Ray actor bit-identical.
            torch.set_num_threads(cfg.cpu_threads)

    @cached_property
    def memory_plan(self) -> MemoryPlan:
        """One plan for the models that share this process's GPU (all three in process; one per whole-GPU actor)."""
        needs = {level: self.profile.memory_gib(level, self.gpu_shared_by) for level in LEVELS}
        return plan_memory(needs, gpu_memory_gib(self.device),
                           self.cfg.memory, what=f"profile {self.profile.name}")

    @cached_property
    def sd(self):
        return load_pipeline(self.profile.spec("sd"), "sd", self.device, self.memory_plan)

    @cached_property
    def video(self):
        return load_pipeline(self.profile.spec("video"), "video", self.device, self.memory_plan)

    @cached_property
    def clip(self) -> ClipEmbedder:
        return ClipEmbedder.load(self.profile.clip, self.device)

    @cached_property
    def selector(self) -> ContrastiveSelector:
        return load_selector(self.cfg.selector)

    def for_run(self, cfg: RunConfig) -> "LocalBackend":
        """A backend for another run config (another selector or mode) sharing the models loaded here."""
        other = LocalBackend(self.profile, cfg)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("sd", "video", "clip")})
        return other

    def load_all(self) -> None:
        """Load every model now, so a missing one stops the run before any task starts."""
        self.memory_plan, self.sd, self.video, self.clip, self.selector  # noqa: B018

    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]:
        return latent_shape(self.sd, sd)

    def render_many(self, caption, latent_batches, sd, capture_iterations):
        return [render_batch(self.sd, caption, batch, sd, capture_iterations) for batch in latent_batches]

    def embed_texts(self, texts):
        return self.clip.texts(texts)

    def embed_images(self, images):
        return self.clip.images(images)

    def selector_scores(self, next_text, next_image, past_text, past_image):
        return self.selector.score(next_text, next_image, past_text, past_image, self.cfg.selector_mode)

    def animate(self, image, seed, video, prompt=None):
        if "decode_chunk_size<=2" in self.memory_plan.savers and video.decode_chunk_size:
            video = dataclasses.replace(video, decode_chunk_size=min(video.decode_chunk_size, SMALL_DECODE_CHUNK))
        return animate(self.video, image, seed, video, prompt)


def make_backend(profile: Profile, cfg: RunConfig, gpu_shared_by: tuple[str, ...] = KINDS):
    """The backend a profile asks for: its models in this process, or the latency simulator.

    A profile with ``"backend": "simulated"`` (``latency``) runs no model; see `cosed.simulate`.
    """
    if profile.backend == "simulated":
        from cosed.simulate import SimulatedBackend

        return SimulatedBackend(profile, cfg)
    return LocalBackend(profile, cfg, gpu_shared_by=gpu_shared_by)
