"""A latency-simulating backend, for scheduling benchmarks only: no model runs.

Each call sleeps for its modeled GPU time (the profile's ``costs`` times
``COSED_TIME_SCALE``) and returns small arrays derived from a hash of its
inputs, so runs are reproducible and the real engine, selector math, latent
pool, Ray dispatch, storage of parts and stitching all run around it. Pick it
with a profile whose ``backend`` is ``simulated`` (``--profile latency``).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
import torch

from cosed.calls import ClipDone, ClipRequest, EmbedImages, EmbedTexts, EncodeScene, Rendered, RenderRequest, Score
from cosed.config import RunConfig, SDConfig
from cosed.distributed.costs import CostModel
from cosed.images import thumbnail_png
from cosed.models.profiles import Profile
from cosed.selector import EMBED_DIM, ContrastiveSelector
from cosed.video import existing_clip, scene_image, write_clip

TIME_SCALE_ENV = "COSED_TIME_SCALE"
LATENT_CHANNELS = 4
LATENT_SCALE = 8


def _rng(*parts) -> np.random.Generator:
    """A generator seeded by the bytes of ``parts``: same inputs, same draws, on every worker."""
    digest = hashlib.sha256()
    for part in parts:
        data = np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else repr(part).encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return np.random.default_rng(int.from_bytes(digest.digest()[:8], "big"))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


class SimulatedBackend:
    """The `Backend` protocol with modeled latencies instead of models (see module docstring)."""

    def __init__(self, profile: Profile, cfg: RunConfig, time_scale: float | None = None):
        self.costs = CostModel.from_dict(profile.costs, cfg.ray.costs)
        self.time_scale = float(os.environ.get(TIME_SCALE_ENV, "1")) if time_scale is None else time_scale
        self.device = torch.device("cpu")
        torch.set_num_threads(cfg.cpu_threads)  # the selector's float sums, as in `LocalBackend`
        self.selector = ContrastiveSelector.from_path(cfg.selector)
        self.selector_mode = cfg.selector_mode
        # Nothing to load: a pool "loads" its model by reading the costs.
        self.sd = self.video = self.clip = self.costs

    def load_all(self) -> None:
        """Nothing to load (kept for the `LocalBackend` interface)."""

    def _wait(self, operation: str, items: int) -> None:
        time.sleep(self.costs.seconds(operation, items) * self.time_scale)

    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]:
        return (LATENT_CHANNELS, sd.height // LATENT_SCALE, sd.width // LATENT_SCALE)

    def render(self, requests: list[RenderRequest]) -> list[Rendered]:
        return [self.render_one(request) for request in requests]

    def render_one(self, request: RenderRequest) -> Rendered:
        self._wait("render", request.size)
        sd = request.sd
        images, captured = [], {k: [] for k in request.capture}
        for latent in request.latents:
            rng = _rng(request.caption, latent)
            images.append(rng.integers(0, 256, (sd.height, sd.width, 3), dtype=np.uint8))
            for k in request.capture:
                captured[k].append(latent * (1.0 - 0.05 * k) + 0.1 * rng.standard_normal(latent.shape))
        thumbnails = [thumbnail_png(image, request.thumbnail_px) for image in images] if request.thumbnail_px else None
        return Rendered(images=images, captured={k: np.stack(v).astype(np.float16) for k, v in captured.items()},
                        thumbnails=thumbnails)

    def encode_scene(self, request: EncodeScene) -> dict[int, np.ndarray]:
        self._wait("render", 1)
        rng = _rng("scene", request.image, request.seed)
        shape = self.latent_shape(request.sd)
        return {k: rng.standard_normal(shape).astype(np.float16) for k in request.capture}

    def embed_texts(self, request: EmbedTexts) -> np.ndarray:
        self._wait("embed_texts", len(request.texts))
        return _unit(np.stack([_rng("text", t).standard_normal(EMBED_DIM) for t in request.texts]))

    def embed_images(self, request: EmbedImages) -> np.ndarray:
        self._wait("embed_images", len(request.images))
        return _unit(np.stack([_rng("image", image).standard_normal(EMBED_DIM) for image in request.images]))

    def selector_scores(self, request: Score) -> np.ndarray:
        self._wait("selector_scores", len(request.next_image))
        return self.selector.score(request.next_text, request.next_image, request.past_text, request.past_image,
                                   self.selector_mode)

    def animate(self, request: ClipRequest) -> ClipDone:
        found = existing_clip(request)
        if found:
            return found
        return write_clip(request, self.frames(scene_image(request), request))

    def frames(self, image: np.ndarray, request: ClipRequest) -> np.ndarray:
        self._wait("animate", 1)
        video = request.video
        rng = _rng("clip", image, request.seed, *((request.next_scene_sha256,) if request.next_scene else ()))
        base = rng.integers(0, 256, (1, video.height, video.width, 3)).astype(np.int16)
        steps = rng.integers(-8, 9, (video.num_frames, 1, 1, 3)).cumsum(axis=0)
        return np.clip(base + steps, 0, 255).astype(np.uint8)

    def fetch(self, handle: Any) -> np.ndarray:
        return handle
