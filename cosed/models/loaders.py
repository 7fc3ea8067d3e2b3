"""One loader per model kind. Each takes a hub id or a local folder, the same way."""

from __future__ import annotations

import json
import warnings
from functools import cache
from pathlib import Path

import torch

from cosed.memory import MemoryPlan, apply_memory_plan
from cosed.models.hub import ROLES, ModelSpec, clip_hub_file, hub_error


@cache
def quiet_libraries() -> None:
    """Loading bars and version chatter would drown the per-task progress.

    Called by each loader, not at import: drivers, writers and simulated model
    actors import this module but never load a model, and diffusers plus
    transformers cost every such process about 160 MB.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device, name: str = "float16") -> torch.dtype:
    """The profile's dtype on a GPU; float32 on the CPU (half precision is slow or unsupported there)."""
    return getattr(torch, name) if device.type == "cuda" else torch.float32


def load_pipeline(spec: ModelSpec, kind: str, device: torch.device, plan: MemoryPlan | None = None):
    """A diffusers pipeline of the spec's class, from safetensors only, with the memory plan applied.

    One loader for every pipeline family: the class name comes from the profile and
    the adapter registry adds what the family needs (no safety checker for SD).
    """
    import diffusers

    from cosed.models.adapters import image_to_video_adapter, text_to_image_adapter

    quiet_libraries()

    adapter = text_to_image_adapter(spec.pipeline) if kind == "sd" else image_to_video_adapter(spec.pipeline)
    kwargs = {"torch_dtype": default_dtype(device, spec.dtype), "use_safetensors": True, **adapter.load_kwargs}
    if spec.variant:
        kwargs["variant"] = spec.variant
    try:
        pipe = getattr(diffusers, spec.pipeline).from_pretrained(spec.source, **kwargs)
    except (OSError, ValueError) as exc:
        raise hub_error(ROLES[kind], spec.source, exc) from exc
    pipe.set_progress_bar_config(disable=True)
    return apply_memory_plan(pipe, plan or MemoryPlan("plain"), device)


def load_clip(source: str, device: torch.device):
    """An open_clip model, its eval transform and tokenizer.

    ``source`` is ``NAME/PRETRAINED`` for a built-in architecture (``ViT-B-32/openai``)
    or a folder in open_clip's hub layout (``open_clip_config.json`` + safetensors).
    """
    import open_clip

    quiet_libraries()
    if Path(source).is_dir():
        name, pretrained = f"local-dir:{source}", None
    else:
        name, _, pretrained = source.partition("/")
        pretrained = pretrained or None
    try:
        if pretrained:
            pretrained = _clip_safetensors(source) or pretrained
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise hub_error("CLIP", source, exc) from exc
    model.eval()
    return model, preprocess, tokenizer


def _clip_safetensors(source: str) -> str | None:
    """The hub safetensors file of an open_clip pretrained tag, so open_clip never falls back to a pickle."""
    from huggingface_hub import hf_hub_download

    hub = clip_hub_file(source)
    return hf_hub_download(*hub) if hub else None


def load_lm(source: str, device: torch.device | str, dtype: str = "bfloat16"):
    """A transformers causal (or seq2seq) LM with its tokenizer, for captions: safetensors only.

    ``source`` is a hub id or a local folder (a trained captioner is one). ``dtype`` applies on a
    GPU; the CPU gets float32. The tokenizer pads on the left, as batched generation needs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    quiet_libraries()
    device = torch.device(device)
    adapters = Path(source) / "adapter_config.json"
    if adapters.is_file():  # LoRA adapters (train-captioner --recipe paper): the base with them merged in
        from peft import PeftModel

        base = json.loads(adapters.read_text(encoding="utf-8"))["base_model_name_or_path"]
        model, _ = load_lm(base, device, dtype)
        model = PeftModel.from_pretrained(model, source).merge_and_unload()
        return model.to(device).eval(), AutoTokenizer.from_pretrained(source, padding_side="left")
    try:
        config = AutoConfig.from_pretrained(source)
        model_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = model_cls.from_pretrained(source, use_safetensors=True, dtype=default_dtype(device, dtype))
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    except (OSError, ValueError) as exc:
        raise hub_error("caption LM", source, exc) from exc
    return model.to(device).eval(), tokenizer


def save_lm(model, tokenizer, folder: str | Path) -> None:
    """Write an LM as `load_lm` reads it back: safetensors weights, config, generation config, tokenizer."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
