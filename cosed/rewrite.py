"""Visual-caption rewriters (method.md §1): each step becomes a self-contained caption.

``identity`` and ``template`` are deterministic and need no model; ``given``
uses the task's own captions (``captions`` in JSONL, the authors'
``steps_generated`` in the recipes layout); ``lm`` prompts
any transformers causal or seq2seq model with the reference window of two
(previous caption, current step), greedily, and caches captions on disk by
(model, prompt) hash so a re-run never re-generates them.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from cosed.tasks import Task

CLIP_CONTEXT_TOKENS = 77
LM_PROMPT = "### Instruction:\nGive me the image caption for this recipe.\n\n### Input:\n{steps}\n\n### Response:\n"


def lm_prompt(previous: str, current: str) -> str:
    """The reference prompt: a window of two (previous caption, current step), or the first step alone."""
    steps = f"Step 1: {previous}\nStep 2: {current}" if previous else f"Step 1: {current}"
    return LM_PROMPT.format(steps=steps)


@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def truncate_to_clip(text: str, max_tokens: int = CLIP_CONTEXT_TOKENS - 2) -> str:
    """Cut text to what a CLIP text encoder sees (77 tokens with start and end)."""
    words = text.split()
    if len(_bpe().encode(text)) <= max_tokens:
        return " ".join(words)
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_bpe().encode(" ".join(words[:mid]))) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


class Rewriter(Protocol):
    name: str

    def captions(self, task: Task) -> list[str]:
        """One caption per step, in step order."""


class IdentityRewriter:
    name = "identity"

    def captions(self, task: Task) -> list[str]:
        return [truncate_to_clip(step) for step in task.steps]


class TemplateRewriter:
    """Title plus step: the cheapest way to give a step its missing subject."""

    name = "template"

    def captions(self, task: Task) -> list[str]:
        return [truncate_to_clip(f"{task.title}: {step}" if task.title else step) for step in task.steps]


class GivenRewriter:
    """The captions the task carries, e.g. the authors' InstructBLIP captions of the shared recipes."""

    name = "given"

    def captions(self, task: Task) -> list[str]:
        if not task.captions:
            raise ValueError(f"task {task.id!r} carries no captions: the given rewriter needs 'captions' "
                             "(JSONL) or 'steps_generated' (recipes layout), one per step")
        return [truncate_to_clip(caption) for caption in task.captions]


def default_rewriter(tasks: list[Task]) -> str:
    """``given`` when every task carries its own captions (the authors' on the shared recipes), else ``template``."""
    return "given" if tasks and all(task.captions for task in tasks) else "template"


class LMRewriter:
    def __init__(self, source: str, cache_dir: Path, device: torch.device, max_new_tokens: int = 77):
        from cosed.models.loaders import load_lm

        self.name = f"lm:{source}"
        self.source = source
        self.model, self.tokenizer = load_lm(source, device)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.cache_dir = Path(cache_dir) / "captions"

    def captions(self, task: Task) -> list[str]:
        captions: list[str] = []
        previous = ""
        for step in task.steps:
            caption = self.caption(lm_prompt(previous, step)) or truncate_to_clip(step)
            captions.append(caption)
            previous = caption
        return captions

    def caption(self, prompt: str) -> str:
        key = hashlib.sha256(f"{self.source}\x1f{self.max_new_tokens}\x1f{prompt}".encode()).hexdigest()
        cached = self.cache_dir / f"{key}.txt"
        if cached.is_file():
            return cached.read_text(encoding="utf-8")
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if not self.model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1]:]
        text = truncate_to_clip(self.tokenizer.decode(output[0], skip_special_tokens=True).strip())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cached.write_text(text, encoding="utf-8")
        return text


def make_rewriter(name: str, *, model: str | None = None, cache_dir: Path | None = None,
                  device: torch.device | None = None) -> Rewriter:
    """The named rewriter, ready: what it loads (a model, or the CLIP tokenizer that truncates
    captions, seconds on first use) loads here, not inside the first task's time."""
    simple = {"identity": IdentityRewriter, "template": TemplateRewriter, "given": GivenRewriter}
    if name in simple:
        _bpe()
        return simple[name]()
    if name == "lm":
        if not model:
            raise ValueError("the lm rewriter needs rewriter_model (a hub id or a local folder)")
        from cosed.models.profiles import default_cache_dir

        return LMRewriter(model, cache_dir or default_cache_dir(), device or torch.device("cpu"))
    raise ValueError(f"unknown rewriter {name!r}: use identity, template, given or lm")
