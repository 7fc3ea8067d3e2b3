"""Where hub models come from and what a failed load means: shared by the loaders, `fetch` and the profiles.

It imports nothing of cosed's, so every module under `cosed.models` can use it
without an import cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CAPTION = "caption"
ROLES = {"sd": "text-to-image", "video": "image-to-video", "clip": "CLIP", CAPTION: "caption LM"}
CLIP_WEIGHTS = "open_clip_model.safetensors"


class ModelUnavailable(RuntimeError):
    """A model could not be loaded (offline hub, gated repo, missing folder); the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """Where one model comes from and what it needs."""

    source: str
    pipeline: str | None = None
    variant: str | None = None
    dtype: str = "float16"
    licence: str = ""
    gated: bool = False
    memory_gib: dict[str, float] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)   # captioner only: `cosed train-captioner` defaults

    @property
    def is_hub(self) -> bool:
        """A diffusers repo id (not a local folder, not an open_clip ``NAME/PRETRAINED`` pair)."""
        return self.pipeline is not None and not Path(self.source).exists()

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.source}"


def clip_hub_file(source: str) -> tuple[str, str] | None:
    """(repo, file) of an open_clip ``NAME/PRETRAINED`` pair's safetensors weights on the hub, or None."""
    import open_clip

    name, _, tag = source.partition("/")
    if not tag:
        return None
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if not cfg.get("hf_hub"):
        return None
    repo, filename = os.path.split(cfg["hf_hub"])
    if filename.endswith((".bin", ".pth")):
        return repo, filename[:-4] + ".safetensors"
    return repo, filename if filename.endswith(".safetensors") else CLIP_WEIGHTS


def _is_gated_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import GatedRepoError

    seen = exc
    while seen is not None:
        if isinstance(seen, GatedRepoError) or "gated" in str(seen).lower() or " 401 " in f" {seen} ":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hub_error(kind: str, source: str, exc: Exception) -> ModelUnavailable:
    """Turn a failed hub or folder load into one sentence that says what to do."""
    if Path(source).exists():
        return ModelUnavailable(f"could not load the {kind} model from folder {source}: {exc}")
    if _is_gated_error(exc):
        return ModelUnavailable(
            f"could not load the {kind} model {source!r}, which is gated on the Hugging Face hub: accept its licence at "
            f"https://huggingface.co/{source} with your account, then set HF_TOKEN (or run `hf auth login`) "
            "and run `cosed models fetch`, or use --profile tiny for the offline random-weight models.")
    if _is_offline_error(exc):
        return ModelUnavailable(
            f"could not load the {kind} model {source!r}: it is not in the local Hugging Face cache and the hub "
            "cannot be reached (offline): run `cosed models fetch --profile PROFILE` on a connected machine (or point HF_HOME at a "
            "warm cache), pass a local folder as --profile, or use --profile tiny for the offline random-weight models.")
    return ModelUnavailable(
        f"could not load the {kind} model {source!r} from the Hugging Face hub "
        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}): "
        "check the id and your network, run `cosed models fetch --profile PROFILE`, "
        "or use --profile tiny for the offline random-weight models.")


def _is_offline_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = exc
    while seen is not None:
        if isinstance(seen, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)) or \
                "connect" in type(seen).__name__.lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False
