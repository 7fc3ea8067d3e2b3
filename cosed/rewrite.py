"""Visual-caption rewriters (method.md §1): each step becomes a self-contained caption.

``identity`` and ``template`` are deterministic and need no model; ``given``
uses the task's own captions (``captions`` in JSONL, the authors'
``steps_generated`` in the recipes layout); ``lm`` asks a caption LM
(`cosed.captioner.Captioner`: the profile's, or a trained one) with the
reference window of two (previous caption, current step), step by step,
through its shared caption cache, so a re-run never generates a caption twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from cosed.cliptext import clip_bpe, truncate_to_clip
from cosed.tasks import Task

if TYPE_CHECKING:
    from cosed.captioner import Captioner

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
    """Captions from a caption LM, step by step: each step's window holds step 1's raw text (at step 2) or the
    caption just made for the previous step (`cosed.captioner.window_context`)."""

    def __init__(self, captioner: "Captioner"):
        self.captioner = captioner
        self.name = f"lm:{captioner.source}"

    def captions(self, task: Task) -> list[str]:
        from cosed.captioner import window_context

        captions: list[str] = []
        for index, step in enumerate(task.steps):
            captions.append(self.captioner.caption_pairs([(window_context(task.steps, captions, index), step)])[0])
        return captions


def make_rewriter(name: str, *, model: str | None = None, cache_dir: Path | None = None,
                  device: torch.device | None = None, cache_root: str | None = None) -> Rewriter:
    """The named rewriter, ready: what it loads (a model, or the CLIP tokenizer that truncates
    captions, seconds on first use) loads here, not inside the first task's time.

    ``lm`` needs ``model`` (a hub id, a folder or ``tiny:captioner``; `resolve_run` fills in the
    profile's captioner); its captions are cached under ``cache_root`` (default ``<cache_dir>/captions``).
    """
    simple = {"identity": IdentityRewriter, "template": TemplateRewriter, "given": GivenRewriter}
    if name in simple:
        clip_bpe()
        return simple[name]()
    if name == "lm":
        if not model:
            raise ValueError("the lm rewriter needs rewriter_model (a hub id or a local folder)")
        from cosed.captioner import Captioner

        clip_bpe()
        captioner = Captioner(model, device=device or torch.device("cpu"), cache_dir=cache_dir, cache_root=cache_root)
        return LMRewriter(captioner.load())
    raise ValueError(f"unknown rewriter {name!r}: use identity, template, given or lm")
