"""A contact sheet of a task's chosen scenes with their step numbers and captions."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_TILE = 192
_TEXT_HEIGHT = 120


def storyboard_png(title: str, scenes: list[np.ndarray], captions: list[str], sources: list[str],
                   first_step: int = 1) -> bytes:
    """One sheet: the title, then each scene with its step number (from ``first_step``: 0 where the first tile
    is the user's own scene image), its source and its caption."""
    font = ImageFont.load_default()
    sheet = Image.new("RGB", (_TILE * len(scenes), 24 + _TILE + _TEXT_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title[:120], fill="black", font=font)
    for index, (scene, caption, source) in enumerate(zip(scenes, captions, sources)):
        x = index * _TILE
        tile = Image.fromarray(scene).resize((_TILE - 8, _TILE - 8), Image.Resampling.NEAREST)
        sheet.paste(tile, (x + 4, 24))
        lines = [f"Step {index + first_step}  [{source}]"] + textwrap.wrap(caption, width=30)[:7]
        draw.multiline_text((x + 6, 24 + _TILE), "\n".join(lines), fill="black", font=font, spacing=2)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
