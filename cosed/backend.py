"""Where model work runs. The engine only talks to a `Backend`.

`LocalBackend` runs every model in this process; the Ray backend in
`cosed.distributed` sends the same calls to model actors. Both call the same
core functions, so their outputs match byte for byte.
"""

from __future__ import annotations

from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from cosed.config import RunConfig, SDConfig, VideoConfig
from cosed.generate import RenderedBatch, latent_shape, render_batch
from cosed.models.profiles import Profile
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

    def animate(self, image: np.ndarray, seed: int, video: VideoConfig) -> np.ndarray: ...


def load_selector(path: str | None) -> ContrastiveSelector:
    return ContrastiveSelector.load(path) if path else ContrastiveSelector.untrained()


class LocalBackend:
    """All models in this process, each loaded on first use."""

    def __init__(self, profile: Profile, cfg: RunConfig):
        # Imported here: diffusers costs every driver and simulated worker process ~170 MB it never uses.
        from cosed.models.loaders import resolve_device

        self.profile = profile
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            # CPU float reductions depend on the thread count: fixing it keeps
            # in-process runs and every Ray actor bit-identical.
            torch.set_num_threads(cfg.cpu_threads)

    @cached_property
    def sd(self):
        from cosed.models.loaders import load_sd

        return load_sd(self.profile.sd, self.device)

    @cached_property
    def video(self):
        from cosed.models.loaders import load_video

        return load_video(self.profile.video, self.device)

    @cached_property
    def clip(self) -> ClipEmbedder:
        return ClipEmbedder.load(self.profile.clip, self.device)

    @cached_property
    def selector(self) -> ContrastiveSelector:
        return load_selector(self.cfg.selector)

    def load_all(self) -> None:
        """Load every model now, so a missing one stops the run before any task starts."""
        self.sd, self.video, self.clip, self.selector  # noqa: B018

    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]:
        return latent_shape(self.sd, sd)

    def render_many(self, caption, latent_batches, sd, capture_iterations):
        return [render_batch(self.sd, caption, batch, sd, capture_iterations) for batch in latent_batches]

    def embed_texts(self, texts):
        return self.clip.texts(texts)

    def embed_images(self, images):
        return self.clip.images(images)

    def selector_scores(self, next_text, next_image, past_text, past_image):
        return self.selector.score(next_text, next_image, past_text, past_image)

    def animate(self, image, seed, video):
        return animate(self.video, image, seed, video)


def make_backend(profile: Profile, cfg: RunConfig):
    """The backend a profile asks for: its models in this process, or the latency simulator.

    A profile with ``"backend": "simulated"`` (``latency``) runs no model; see `cosed.simulate`.
    """
    if profile.backend == "simulated":
        from cosed.simulate import SimulatedBackend

        return SimulatedBackend(profile, cfg)
    return LocalBackend(profile, cfg)
