"""Resolve a profile name or folder into model specs and defaults.

A profile is data: for each model kind (``sd``: text-to-image, ``video``:
image-to-video, ``clip``) it names the source, the diffusers pipeline class
(which picks the adapter in `cosed.models.adapters`), the weight variant and
dtype, the licence and whether the hub gates the download, and the expected
peak GPU memory at the profile's settings for each memory plan level.

A profile may also name a ``caption`` model: the `lm` rewriter's captioner
(`cosed.captioner`), its default model. It is not one of `KINDS`: it decides
outputs only under ``rewriter: lm``, so it enters neither `Profile.model_names`
(every task's fingerprint) nor the memory of the image and video models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosed.models.hub import CAPTION, ModelSpec, ModelUnavailable

_PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
_TINY_PREFIX = "tiny:"
KINDS = ("sd", "video", "clip")
DEFAULT_PIPELINES = {"sd": "StableDiffusionPipeline", "video": "StableVideoDiffusionPipeline", "clip": None,
                     CAPTION: "AutoModelForCausalLM"}


def spec_from_data(kind: str, data: str | dict[str, Any], cache: Path) -> ModelSpec:
    """A profile's model entry (a source, or a mapping with one) as a `ModelSpec`, its source resolved."""
    data = {"source": data} if isinstance(data, str) else dict(data)
    data["source"] = resolve_source(data["source"], cache)
    data.setdefault("pipeline", _folder_pipeline(data["source"]) or DEFAULT_PIPELINES[kind])
    return ModelSpec(**data)


@dataclass(frozen=True)
class Profile:
    name: str
    sd: str
    video: str
    clip: str
    defaults: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    description: str = ""
    specs: dict[str, ModelSpec] = field(default_factory=dict)
    tiny_twin: str | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"
    caption: str | None = None          # the captioner's resolved source (a folder or a hub id)
    caption_model: str | None = None    # as the profile names it (``tiny:captioner``): the lm rewriter's default

    def spec(self, kind: str) -> ModelSpec:
        return self.specs.get(kind) or ModelSpec(source=getattr(self, kind), pipeline=DEFAULT_PIPELINES[kind])

    def model_names(self) -> dict[str, str]:
        """Stable model names for manifests: tiny models by name, not by cache path."""
        return {"sd": self._label(self.sd), "video": self._label(self.video), "clip": self._label(self.clip)}

    def memory_gib(self, level: str, kinds: tuple[str, ...] = KINDS) -> float | None:
        """Expected peak GPU memory of ``kinds`` together at a plan level; None when the profile does not say."""
        values = [self.spec(k).memory_gib.get(level) for k in kinds]
        return None if any(v is None for v in values) else float(sum(values))

    def _label(self, source: str) -> str:
        return source if not self.random_weights else f"cosed-tiny-{Path(source).name} (random weights)"


def default_cache_dir() -> Path:
    return Path(os.environ.get("COSED_CACHE", Path.home() / ".cache" / "cosed"))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in _PROFILE_DIR.glob("*.json"))


def profile_data(name: str) -> dict[str, Any]:
    """The raw JSON of a named profile (no model is built or downloaded)."""
    return json.loads((_PROFILE_DIR / f"{name}.json").read_text(encoding="utf-8"))


def resolve_profile(name_or_folder: str, cache_dir: str | os.PathLike | None = None) -> Profile:
    """A named profile from ``cosed/profiles`` or a folder holding ``sd/``, ``video/`` and ``clip/``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    named = _PROFILE_DIR / f"{name_or_folder}.json"
    if named.is_file():
        data = json.loads(named.read_text(encoding="utf-8"))
        specs = {kind: spec_from_data(kind, src, cache) for kind, src in data["models"].items()}
        caption_model = _raw_source(data["models"].get(CAPTION))
        costs = dict(data.get("costs", {}))
        return Profile(name=data["name"], defaults=_with_caption_default(data.get("defaults", {}), caption_model),
                       random_weights=data.get("random_weights", False), description=data.get("description", ""),
                       specs=specs, tiny_twin=data.get("tiny_twin"), costs=costs,
                       caption_model=caption_model, backend=data.get("backend", "local"),
                       **{k: s.source for k, s in specs.items()})
    folder = Path(name_or_folder)
    if folder.is_dir():
        missing = [kind for kind in KINDS if not (folder / kind).is_dir()]
        if missing:
            raise ModelUnavailable(f"profile folder {folder} lacks {', '.join(missing)}/ "
                                   "(a profile folder holds sd/, video/ and clip/ in the standard formats)")
        meta_path = folder / "profile.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        kinds = KINDS + ((CAPTION,) if (folder / CAPTION).is_dir() else ())
        # profile.json may describe each model as a named profile does (dtype, memory_gib, licence, ...).
        described = meta.get("models", {})
        specs = {kind: spec_from_data(kind, {**described.get(kind, {}), "source": str(folder / kind)}, cache)
                 for kind in kinds}
        caption_model = str(folder / CAPTION) if CAPTION in specs else None
        costs = dict(meta.get("costs", {}))
        return Profile(name=meta.get("name", str(folder)), sd=str(folder / "sd"), video=str(folder / "video"),
                       clip=str(folder / "clip"), caption=caption_model, caption_model=caption_model,
                       defaults=_with_caption_default(meta.get("defaults", {}), caption_model),
                       random_weights=meta.get("random_weights", False), description=meta.get("description", ""),
                       specs=specs, costs=costs)
    raise ModelUnavailable(f"unknown profile {name_or_folder!r}: use one of {', '.join(available_profiles())} "
                           "or a folder holding sd/, video/ and clip/")


def _raw_source(data: str | dict[str, Any] | None) -> str | None:
    return data if isinstance(data, str) or data is None else data["source"]


def _with_caption_default(defaults: dict[str, Any], caption_model: str | None) -> dict[str, Any]:
    """The profile's captioner becomes the default ``rewriter_model`` (used only under ``rewriter: lm``)."""
    return {**defaults, "rewriter_model": caption_model} if caption_model else dict(defaults)


def resolve_source(source: str, cache: Path) -> str:
    """A model source as loaders take it: ``tiny:NAME`` becomes its folder in the tiny zoo (built once)."""
    if source.startswith(_TINY_PREFIX):
        from cosed.models.tiny import ensure_tiny_models, zoo_of

        model = source[len(_TINY_PREFIX):]
        return str(ensure_tiny_models(cache, zoo_of(model)) / model)
    return source


def _folder_pipeline(source: str) -> str | None:
    """A local diffusers folder names its pipeline class in model_index.json."""
    index = Path(source) / "model_index.json"
    return json.loads(index.read_text(encoding="utf-8"))["_class_name"] if index.is_file() else None
