"""Images as PNG bytes: how scenes and candidates are stored (lossless, so a stored scene is its pixels)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_image(data: bytes) -> np.ndarray:
    """Pixels of a PNG: the array `png_bytes` was given."""
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGB"))


def thumbnail_png(image: np.ndarray, size: int) -> bytes:
    """A candidate kept for inspection only: at most ``size`` pixels a side, as PNG."""
    picture = Image.fromarray(image)
    if max(image.shape[:2]) > size:
        picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
