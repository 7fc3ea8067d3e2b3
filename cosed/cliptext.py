"""CLIP's text window: what a CLIP text encoder sees of a caption (77 tokens with start and end).

Every caption, whichever rewriter made it, is cut to this window with the real CLIP BPE.
"""

from __future__ import annotations

from functools import lru_cache

CLIP_CONTEXT_TOKENS = 77


@lru_cache(maxsize=1)
def clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


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
