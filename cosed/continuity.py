"""Boundary continuity of a video: how far the last frame of each clip is from the first frame of the next.

Two numbers, both lower = smoother: ``boundary_mad``, the mean absolute pixel difference (0-255) of the two
frames, averaged over boundaries; ``boundary_clip``, 100 x (1 - cosine) of their CLIP image embeddings. With
``--transitions keyframe`` clip i ends conditioned on scene i+1's image, the image clip i+1 starts from, so
with real weights both should fall against ``cut``. Measured on the clips before any dissolve (a dissolve
smooths the joined video by construction, not the clips).
"""

from __future__ import annotations

import io
from typing import Callable

import av
import numpy as np

from cosed.embed import l2_normalize


def end_frames(clip: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The first and last decoded frames of an encoded clip (RGB uint8)."""
    first = last = None
    with av.open(io.BytesIO(clip), mode="r") as container:
        for frame in container.decode(video=0):
            last = frame.to_ndarray(format="rgb24")
            if first is None:
                first = last
    if first is None:
        raise ValueError("a clip without frames")
    return first, last


def boundaries(clips: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(last frame of clip i, first frame of clip i+1) for each boundary, in order."""
    ends = [end_frames(clip) for clip in clips]
    return [(ends[i][1], ends[i + 1][0]) for i in range(len(ends) - 1)]


def pixel_distance(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float | None:
    """Mean absolute pixel difference over the boundaries; None for a one-clip video."""
    if not pairs:
        return None
    return float(np.mean([np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() for a, b in pairs]))


def clip_distance(pairs: list[tuple[np.ndarray, np.ndarray]],
                  embed: Callable[[list[np.ndarray]], np.ndarray]) -> float | None:
    """Mean 100 x (1 - cos) of the boundary frames' CLIP embeddings (``embed``: images -> raw features)."""
    if not pairs:
        return None
    features = l2_normalize(np.asarray(embed([frame for pair in pairs for frame in pair]), dtype=np.float64))
    before, after = features[0::2], features[1::2]
    return float(100.0 * np.mean(1.0 - np.sum(before * after, axis=1)))
