"""Download exactly the weight files a profile's pipelines (and its captioner) load, into the standard hub cache.

Only safetensors (the fp16 variant where the profile names one and the repo
has it), configs and tokenizer files; never pickled ``.bin`` files, never the
single-file checkpoints some repos keep at their root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from cosed.models.hub import CAPTION, ROLES, ModelSpec, ModelUnavailable, clip_hub_file, hub_error
from cosed.models.profiles import Profile

CONFIG_SUFFIXES = (".json", ".txt", ".model")
LM_SUFFIXES = CONFIG_SUFFIXES + (".jinja", ".safetensors")


@dataclass(frozen=True)
class HubFiles:
    kind: str
    repo: str
    files: tuple[str, ...] | None  # None: decided from the repo's listing (diffusers pipelines)


def weight_files(repo_files: list[str], variant: str | None) -> list[str]:
    """The files a diffusers ``from_pretrained(..., use_safetensors=True, variant=...)`` reads.

    Per component folder: its configs and tokenizer files, and its variant
    safetensors when the folder has them, else its plain safetensors.
    """
    chosen = [f for f in repo_files if f == "model_index.json"]
    folders: dict[str, list[str]] = {}
    for name in repo_files:
        path = PurePosixPath(name)
        if len(path.parts) == 2:
            folders.setdefault(path.parts[0], []).append(name)
    for names in folders.values():
        chosen += [n for n in names if n.endswith(CONFIG_SUFFIXES)]
        tensors = [n for n in names if n.endswith(".safetensors")]
        marked = [n for n in tensors if variant and f".{variant}." in PurePosixPath(n).name.replace("-", ".")]
        chosen += marked or [n for n in tensors if not _has_variant_mark(n)]
    return sorted(set(chosen))


def lm_weight_files(repo_files: list[str]) -> list[str]:
    """The files a transformers ``from_pretrained(..., use_safetensors=True)`` of a model and its tokenizer
    reads: the top-level configs, tokenizer files, chat template and safetensors (no pickles, no sub-folders)."""
    return sorted(f for f in repo_files if "/" not in f and f.endswith(LM_SUFFIXES))


def _has_variant_mark(name: str) -> bool:
    stem = PurePosixPath(name).name.split(".")
    return len(stem) > 2 and stem[-2].split("-")[0] in ("fp16", "bf16", "fp32")


def hub_files(profile: Profile) -> list[HubFiles]:
    """What to download for a profile (empty for tiny profiles and local folders)."""
    wanted = []
    for kind in ("sd", "video", "clip"):
        spec = profile.spec(kind)
        if kind == "clip":
            hub = clip_hub_file(spec.source)
            if hub:
                wanted.append(HubFiles(kind, hub[0], (hub[1],)))
        elif spec.is_hub:
            wanted.append(HubFiles(kind, spec.source, None))
    caption = profile.specs.get(CAPTION)
    if caption and caption.is_hub:
        wanted.append(HubFiles(CAPTION, caption.source, None))
    return wanted


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def fetch_profile(profile: Profile, progress: bool = True) -> list[str]:
    """Download the profile's files; returns the local snapshot folders. Raises ModelUnavailable in one sentence."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    wanted = hub_files(profile)
    for item in wanted:
        if profile.spec(item.kind).gated and not _token():
            raise ModelUnavailable(
                f"{item.repo} is gated and no Hugging Face token is set: accept its licence at "
                f"https://huggingface.co/{item.repo}, then set HF_TOKEN (or run `hf auth login`) and fetch again.")
    folders = []
    for item in wanted:
        spec: ModelSpec = profile.spec(item.kind)
        try:
            if item.files is None:
                listing = HfApi().list_repo_files(item.repo)
                files = lm_weight_files(listing) if item.kind == CAPTION else weight_files(listing, spec.variant)
                folders.append(snapshot_download(item.repo, allow_patterns=files))
            else:
                folders += [os.path.dirname(hf_hub_download(item.repo, f)) for f in item.files]
        except Exception as exc:  # the hub raises many types (offline, gated, HTTP); all become one sentence
            raise hub_error(ROLES[item.kind], item.repo, exc) from exc
    return folders


def cached(profile: Profile) -> dict[str, bool | None]:
    """Per model kind: True when its files are in the local hub cache, None when nothing needs downloading."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    status: dict[str, bool | None] = {"sd": None, "video": None, "clip": None, CAPTION: None}
    for item in hub_files(profile):
        if item.files is not None:
            status[item.kind] = all(isinstance(try_to_load_from_cache(item.repo, f), str) for f in item.files)
            continue
        try:
            folder = snapshot_download(item.repo, local_files_only=True)
        except Exception:  # not cached (LocalEntryNotFoundError and friends)
            status[item.kind] = False
            continue
        files = [os.path.relpath(os.path.join(root, f), folder) for root, _, names in os.walk(folder) for f in names]
        index = "config.json" if item.kind == CAPTION else "model_index.json"
        status[item.kind] = any(f.endswith(".safetensors") for f in files) and index in files
    return status
