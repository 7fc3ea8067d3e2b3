"""Every model call as a value: one request dataclass per call, built in one place.

The engine builds each request once (`cosed.engine`); a backend runs it in this
process or sends it to a model actor. A retry, a resubmission after a lost actor
and a re-render after a lost driver all send the same value, so no call can
drift from the first (a clip re-rendered without its caption, say). Images
travel as *handles*: arrays in process, object references on Ray, so candidate
pixels go from the text-to-image actor to the CLIP actor without a detour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cosed.config import SDConfig, VideoConfig


@dataclass(frozen=True)
class RenderRequest:
    """One text-to-image batch: every start latent denoised with the caption (method.md §2)."""

    caption: str | tuple[str, ...]  # one for the batch, or one per latent
    latents: np.ndarray  # (B, C, h, w) float32, scheduler-neutral
    sd: SDConfig
    capture: tuple[int, ...]  # iterations whose latents seed later steps' pools
    thumbnail_px: int = 0  # > 0: also return each candidate at most this many pixels a side

    @property
    def size(self) -> int:
        return len(self.latents)


@dataclass
class Rendered:
    """A rendered batch: image handles (one per candidate), captured latents, optional thumbnails."""

    images: list[Any]
    captured: dict[int, np.ndarray]  # iteration -> (B, C, h, w) float16
    thumbnails: list[np.ndarray] | None = None


@dataclass(frozen=True)
class EncodeScene:
    """The user's scene image as latent-pool entries (`cosed.scene_image`): VAE-encoded, then noised with one
    seeded draw to the timestep of each captured iteration (SDEdit), in the pool's scheduler-neutral scale."""

    image: np.ndarray  # (H, W, 3) uint8 at the text-to-image size
    sd: SDConfig
    capture: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class EmbedTexts:
    texts: tuple[str, ...]


@dataclass(frozen=True)
class EmbedImages:
    images: tuple[Any, ...]  # handles (arrays or object references), uint8 (H, W, 3)


@dataclass(frozen=True)
class Score:
    """Selector scores of candidates against past scenes (Eqs. 7-8), from raw CLIP features."""

    next_text: np.ndarray
    next_image: np.ndarray
    past_text: np.ndarray
    past_image: np.ndarray


@dataclass(frozen=True)
class TextClipRequest:
    """One scene's clip from its caption alone (the t2v method), written to ``clip``."""

    task_id: str
    step: int
    caption: str
    seed: int
    video: VideoConfig
    clip: str


@dataclass(frozen=True)
class TalcRequest:
    """The talc method's one generation for a whole task: scene i's first frame (PNG) and clip go to
    ``scenes[i]`` and ``clips[i]``."""

    task_id: str
    captions: tuple[str, ...]
    seed: int
    video: VideoConfig
    scenes: tuple[str, ...]
    clips: tuple[str, ...]


@dataclass(frozen=True)
class ClipRequest:
    """One scene's clip: animate the stored scene image, encode, write to ``clip``.

    The image is read from storage, never carried: whoever resends the request
    (the job after an actor died, a later attempt after a driver died) needs only
    this value. ``caption`` conditions text-driven video models (LTX-Video).
    ``scene_sha256`` binds the clip to the scene's content: the clip's name
    carries it, and the video side refuses a scene whose bytes do not match it.
    Under ``--transitions keyframe`` the clip also ends on the next scene's image: ``next_scene`` and its
    ``next_scene_sha256`` (empty for the last scene and under the other transitions) bind it the same way.
    """

    task_id: str
    step: int
    scene: str  # URI of the chosen image (PNG, lossless)
    seed: int
    video: VideoConfig
    caption: str
    clip: str  # URI the encoded clip is written to
    scene_sha256: str = ""  # of the scene's PNG bytes (none: every scene is refused)
    next_scene: str = ""  # keyframe: URI of the next scene's image, the clip's last frame
    next_scene_sha256: str = ""


@dataclass(frozen=True)
class ClipDone:
    """What a clip call returns: where the clip is, never its bytes."""

    clip: str
    size: int
    frames: int
    reused: bool = False  # it was already there (a retry or a resume): nothing was rendered


@dataclass(frozen=True)
class CaptionRequest:
    """Visual captions for (previous caption, current step) pairs, any tasks mixed (method.md §1).
    ``cache`` is where captions are kept (the run's output prefix): every node reads the same answers."""

    pairs: tuple[tuple[str, str], ...]
    cache: str


@dataclass(frozen=True)
class Captioned:
    captions: tuple[str, ...]
    generated: int = 0  # pairs the model generated (the others came from the cache)
