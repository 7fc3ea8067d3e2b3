"""Named bundles of RunConfig settings: ``paper`` (the authors' reference scripts) and ``legacy`` (this
project's behaviour before the paper preset; the dataclass defaults).

A preset sits between the dataclass defaults and everything else: precedence is dataclass defaults <
preset < the profile's ``defaults`` < ``--config`` file < explicit flags (`cosed.config.load_config`).
Every value a preset fixes lands in its RunConfig field, so it is in the manifest's ``config`` and in
the task fingerprint; the manifest also names the preset and lists what it fixed (`preset_record`).

Sources are files of the authors' public repositories at the commits `fetch` gives:
``CoSeD`` = github.com/novasearch/CoSeD, ``gcs`` = github.com/novasearch/generating-coherent-sequences.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from cosed.errors import UserError

# gcs src/generation/diffuser.py:14-16, joined with ", " as there.
PAPER_NEGATIVE_PROMPT = ("hands, human, person, cropped, deformed, cut off, malformed, out of frame, split image, "
                         "tiling, watermark, text")


@dataclass(frozen=True)
class Setting:
    """One config value a preset fixes, and where the reference fixes it."""

    key: str      # dotted RunConfig key, e.g. "pool.iterations"
    value: Any
    source: str


PAPER = (
    Setting("sd.negative_prompt", PAPER_NEGATIVE_PROMPT,
            "gcs src/generation/diffuser.py:14-17 and :21-22 (passed on every call); switched on in "
            "CoSeD src/generate_only_latents.py:295 (set_use_negative_prompts(True))"),
    Setting("pool.fresh_as", "key",
            "CoSeD src/generate_only_latents.py:66-79: the current step's fresh (\"sd\") image and the current "
            "caption are appended to previous_images/texts_embedding, the selector's keys, never to its candidates"),
    Setting("pool.iterations", [2, 3, 4],
            "CoSeD src/generate_only_latents.py:279 (selected_latents = [-1, 1, 2, 3]) indexes the history the "
            "legacy callback fills after each scheduler step (:136-142, callback_steps=1 at :183 and :233): "
            "index k is the latent after iteration k+1"),
    Setting("pool.steps", "all", "CoSeD src/generate_only_latents.py:211 (for previous_step in range(i))"),
    Setting("pool.fresh", 1, "CoSeD src/generate_only_latents.py:218-225 (one fresh image per step, rendered once)"),
    Setting("pool.n_first", 4, "CoSeD src/generate_only_latents.py:181-197 (4 images, CLIP picks one)"),
    Setting("pool.max_candidates", None, "CoSeD src/generate_only_latents.py:211-241 (every pooled latent, no cap)"),
    Setting("selector_text_chars", 77,
            "CoSeD src/generate_only_latents.py:90 and :96 (previous_texts[:77], current_step_text[:77]: 77 "
            "characters, not tokens); the fresh key's text is the whole caption (:74, before the cut at :96)"),
    Setting("video.seed", 42, "CoSeD src/videos_softattention.py:24 (torch.manual_seed(42) before every clip)"),
)

PRESETS: dict[str, tuple[Setting, ...]] = {"paper": PAPER, "legacy": ()}
DEFAULT_PRESET = "paper"  # of `cosed generate`, `evaluate` and `reproduce` (cosed.cli)


class PresetError(UserError, ValueError):
    """An unknown preset name."""


def check(name: str) -> tuple[Setting, ...]:
    if name not in PRESETS:
        raise PresetError(f"preset must be {' or '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def apply_preset(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config mapping) over the preset's values: keys ``data`` sets win."""
    merged: dict[str, Any] = {}
    for setting in check(name):
        node = merged
        *parents, leaf = setting.key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = copy.deepcopy(setting.value)
    return _deep_merge(merged, {**data, "preset": name})


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def preset_record(cfg) -> dict[str, Any]:
    """The manifest's ``preset``: its name, and each setting it fixes with the value this run used (a
    config file or flag may have changed one; ``overridden`` lists those)."""
    fixed, overridden = {}, []
    for setting in check(cfg.preset):
        value = _get(cfg, setting.key)
        fixed[setting.key] = value
        if value != setting.value:
            overridden.append(setting.key)
    return {"name": cfg.preset, "fixed": fixed, **({"overridden": overridden} if overridden else {})}


def _get(cfg, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
