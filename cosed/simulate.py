"""A latency-simulating backend, for scheduling benchmarks only: no model runs.

Each call sleeps for its modeled GPU time (the profile's ``costs`` times
``COSED_TIME_SCALE``) and returns small arrays derived from a hash of its
inputs, so runs are reproducible and the real engine, selector math, latent
pool, Ray dispatch and stitching all run around it. Pick it with a profile
whose ``backend`` is ``simulated`` (``--profile latency``).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from cosed.config import RunConfig, SDConfig
from cosed.distributed.costs import CostModel
from cosed.generate import RenderedBatch
from cosed.models.profiles import Profile
from cosed.selector import EMBED_DIM, ContrastiveSelector

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
        from cosed.backend import load_selector

        self.costs = CostModel.from_dict(profile.costs, cfg.ray.costs)
        self.time_scale = float(os.environ.get(TIME_SCALE_ENV, "1")) if time_scale is None else time_scale
        self.device = torch.device("cpu")
        torch.set_num_threads(cfg.cpu_threads)  # the selector's float sums, as in `LocalBackend`
        self.selector: ContrastiveSelector = load_selector(cfg.selector)
        self.selector_mode = cfg.selector_mode
        # Nothing to load: a pool "loads" its model by reading the costs.
        self.sd = self.video = self.clip = self.costs

    def load_all(self) -> None:
        """Nothing to load (kept for the `LocalBackend` interface)."""

    def _wait(self, operation: str, items: int) -> None:
        time.sleep(self.costs.seconds(operation, items) * self.time_scale)

    def latent_shape(self, sd: SDConfig) -> tuple[int, ...]:
        return (LATENT_CHANNELS, sd.height // LATENT_SCALE, sd.width // LATENT_SCALE)

    def render_many(self, caption, latent_batches, sd, capture_iterations):
        rendered = []
        for batch in latent_batches:
            self._wait("render", len(batch))
            images, captured = [], {k: [] for k in capture_iterations}
            for latent in batch:
                rng = _rng(caption, latent)
                images.append(rng.integers(0, 256, (sd.height, sd.width, 3), dtype=np.uint8))
                for k in capture_iterations:
                    captured[k].append(latent * (1.0 - 0.05 * k) + 0.1 * rng.standard_normal(latent.shape))
            rendered.append(RenderedBatch(images=np.stack(images),
                                          captured={k: np.stack(v).astype(np.float16) for k, v in captured.items()}))
        return rendered

    def embed_texts(self, texts):
        self._wait("embed_texts", len(texts))
        return _unit(np.stack([_rng("text", t).standard_normal(EMBED_DIM) for t in texts]))

    def embed_images(self, images):
        self._wait("embed_images", len(images))
        return _unit(np.stack([_rng("image", image).standard_normal(EMBED_DIM) for image in images]))

    def selector_scores(self, next_text, next_image, past_text, past_image):
        self._wait("selector_scores", len(next_image))
        return self.selector.score(next_text, next_image, past_text, past_image, self.selector_mode)

    def animate(self, image, seed, video, prompt=None):
        self._wait("animate", 1)
        rng = _rng("clip", image, seed)
        base = rng.integers(0, 256, (1, video.height, video.width, 3)).astype(np.int16)
        steps = rng.integers(-8, 9, (video.num_frames, 1, 1, 3)).cumsum(axis=0)
        return np.clip(base + steps, 0, 255).astype(np.uint8)
