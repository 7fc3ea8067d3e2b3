"""One loader per model kind. Each takes a hub id or a local folder, the same way."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from cosed.models.profiles import hub_error


def _quiet_libraries() -> None:
    """Loading bars and version chatter would drown the per-task progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)


_quiet_libraries()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load_sd(source: str, device: torch.device):
    """A diffusers StableDiffusionPipeline without safety checker, progress bars off."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, torch_dtype=default_dtype(device), safety_checker=None, requires_safety_checker=False,
            use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise hub_error("text-to-image", source, exc) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_video(source: str, device: torch.device):
    """A diffusers StableVideoDiffusionPipeline (image-to-video)."""
    from diffusers import StableVideoDiffusionPipeline

    try:
        pipe = StableVideoDiffusionPipeline.from_pretrained(source, torch_dtype=default_dtype(device),
                                                            use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise hub_error("image-to-video", source, exc) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_clip(source: str, device: torch.device):
    """An open_clip model, its eval transform and tokenizer.

    ``source`` is ``NAME/PRETRAINED`` for a built-in architecture (``ViT-B-32/openai``)
    or a folder in open_clip's hub layout (``open_clip_config.json`` + safetensors).
    """
    import open_clip

    if Path(source).is_dir():
        name, pretrained = f"local-dir:{source}", None
    else:
        name, _, pretrained = source.partition("/")
        pretrained = pretrained or None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise hub_error("CLIP", source, exc) from exc
    model.eval()
    return model, preprocess, tokenizer


def load_lm(source: str, device: torch.device):
    """A transformers causal or seq2seq LM with its tokenizer, for caption rewriting."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
        model_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = model_cls.from_pretrained(source, use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise hub_error("caption LM", source, exc) from exc
    return model, tokenizer
