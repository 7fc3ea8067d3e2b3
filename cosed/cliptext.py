"""CLIP's text window: what a CLIP text encoder sees of a caption (77 tokens with start and end).

Every caption, whichever rewriter made it, is cut to this window with the real CLIP BPE.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

CLIP_CONTEXT_TOKENS = 77


@lru_cache(maxsize=1)
def clip_bpe():
    """open_clip's own BPE tokenizer, loaded from its module file alone: importing the ``open_clip`` package
    imports its whole model zoo (timm, torchvision models: seconds and most of a GiB), which the job
    process and the drivers, which only cut captions, must not pay for. The module imports no other part
    of open_clip, and finds its vocabulary next to itself."""
    package = importlib.util.find_spec("open_clip")  # finds the package without running its __init__
    spec = importlib.util.spec_from_file_location("cosed._open_clip_tokenizer",
                                                  Path(package.origin).parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def truncate_to_clip(text: str, max_tokens: int = CLIP_CONTEXT_TOKENS - 2) -> str:
    """Cut text to what a CLIP text encoder sees (77 tokens with start and end)."""
    words = text.split()
    if len(clip_bpe().encode(text)) <= max_tokens:
        return " ".join(words)
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(clip_bpe().encode(" ".join(words[:mid]))) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])
