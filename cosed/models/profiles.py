"""Resolve a profile name or folder into model sources and defaults."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
_TINY_PREFIX = "tiny:"


class ModelUnavailable(RuntimeError):
    """A model could not be loaded (offline hub, missing folder); the message says what to do."""


@dataclass(frozen=True)
class Profile:
    name: str
    sd: str
    video: str
    clip: str
    defaults: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    description: str = ""
    costs: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"

    def model_names(self) -> dict[str, str]:
        """Stable model names for manifests: tiny models by name, not by cache path."""
        return {"sd": self._label(self.sd), "video": self._label(self.video), "clip": self._label(self.clip)}

    def _label(self, source: str) -> str:
        return source if not self.random_weights else f"cosed-tiny-{Path(source).name} (random weights)"


def default_cache_dir() -> Path:
    return Path(os.environ.get("COSED_CACHE", Path.home() / ".cache" / "cosed"))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in _PROFILE_DIR.glob("*.json"))


def resolve_profile(name_or_folder: str, cache_dir: str | os.PathLike | None = None) -> Profile:
    """A named profile from ``cosed/profiles`` or a folder holding ``sd/``, ``video/`` and ``clip/``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    named = _PROFILE_DIR / f"{name_or_folder}.json"
    if named.is_file():
        data = json.loads(named.read_text(encoding="utf-8"))
        models = {kind: _resolve_source(src, cache) for kind, src in data["models"].items()}
        return Profile(name=data["name"], defaults=data.get("defaults", {}),
                       random_weights=data.get("random_weights", False),
                       description=data.get("description", ""), costs=data.get("costs", {}),
                       backend=data.get("backend", "local"), **models)
    folder = Path(name_or_folder)
    if folder.is_dir():
        missing = [kind for kind in ("sd", "video", "clip") if not (folder / kind).is_dir()]
        if missing:
            raise ModelUnavailable(f"profile folder {folder} lacks {', '.join(missing)}/ "
                                   "(a profile folder holds sd/, video/ and clip/ in the standard formats)")
        meta_path = folder / "profile.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        return Profile(name=meta.get("name", str(folder)), sd=str(folder / "sd"), video=str(folder / "video"),
                       clip=str(folder / "clip"), defaults=meta.get("defaults", {}),
                       random_weights=meta.get("random_weights", False), description=meta.get("description", ""),
                       costs=meta.get("costs", {}))
    raise ModelUnavailable(f"unknown profile {name_or_folder!r}: use one of {', '.join(available_profiles())} "
                           "or a folder holding sd/, video/ and clip/")


def _resolve_source(source: str, cache: Path) -> str:
    if source.startswith(_TINY_PREFIX):
        from cosed.models.tiny import ensure_tiny_models

        return str(ensure_tiny_models(cache) / source[len(_TINY_PREFIX):])
    return source


def hub_error(kind: str, source: str, exc: Exception) -> ModelUnavailable:
    """Turn a failed hub or folder load into one readable sentence."""
    if Path(source).exists():
        return ModelUnavailable(f"could not load the {kind} model from folder {source}: {exc}")
    return ModelUnavailable(
        f"could not load the {kind} model {source!r} from the Hugging Face hub "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). "
        "This machine may be offline: download the weights on a connected machine "
        "(or point HF_HOME at a warm cache; HF_HUB_OFFLINE=1 skips the network retries), "
        "pass a local folder as --profile, "
        "or use --profile tiny for the offline random-weight models.")
