"""Caption rewriters against reference visual captions (the Alpaca-format pairs of method.md §1).

Each pair's input is "Step 1: {previous caption}\\nStep 2: {current step}", or
"Step 1: {current step}" alone for a task's first step. Every
rewriter sees the same two pieces: `identity` the current step, `template` the
previous caption as its context, `lm` the window of two in its captioner's chat template.
"""

from __future__ import annotations

import json
import re

import numpy as np

from cosed.embed import l2_normalize
from cosed.rewrite import LMRewriter, truncate_to_clip

_PAIR_INPUT = re.compile(r"Step 1:(?P<previous>.*?)\n\s*Step 2:(?P<current>.*)", re.S)
_FIRST_STEP = re.compile(r"Step 1:(?P<current>.*)", re.S)


def parse_pairs(data: bytes, *, skip_malformed: bool = False) -> list[tuple[str, str, str]]:
    """(previous caption, current step, reference caption) for each pair.

    A malformed pair is an error, or with ``skip_malformed`` left out (see `read_pairs`).
    """
    return read_pairs(data, skip_malformed=skip_malformed)[0]


def read_pairs(data: bytes, *, skip_malformed: bool = False) -> tuple[list[tuple[str, str, str]], list[int]]:
    """The pairs, and the numbers (from 1) of the malformed ones left out.

    The authors' training file holds two pairs whose input starts at "Step 2:"; training skips them.
    """
    pairs, skipped = [], []
    for number, record in enumerate(json.loads(data.decode("utf-8")), start=1):
        text = record.get("input", "") if isinstance(record, dict) else ""
        match = _PAIR_INPUT.match(text) or _FIRST_STEP.match(text)
        if not match or not isinstance(record.get("output"), str):
            if skip_malformed:
                skipped.append(number)
                continue
            raise ValueError(f"pair {number}: input must read 'Step 1: ...[\\nStep 2: ...]' and output must be text")
        previous = match["previous"].strip() if "previous" in match.groupdict() else ""
        pairs.append((previous, match["current"].strip(), record["output"].strip()))
    return pairs, skipped


def rewrite_pairs(rewriter, pairs: list[tuple[str, str]]) -> list[str]:
    """Each rewriter's caption of (previous caption, current step) pairs; the lm rewriter in batches."""
    if isinstance(rewriter, LMRewriter):
        return rewriter.captioner.caption_pairs(pairs)
    if rewriter.name == "template":
        return [truncate_to_clip(f"{previous}: {current}" if previous else current) for previous, current in pairs]
    return [truncate_to_clip(current) for _, current in pairs]


def score_captions(outputs: list[str], references: list[str], embed_texts) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu) and mean 100 * CLIP text-text cosine."""
    import sacrebleu

    clip = np.sum(l2_normalize(embed_texts(outputs)) * l2_normalize(embed_texts(references)), axis=1)
    return {"bleu": float(sacrebleu.corpus_bleu(outputs, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(outputs, [references]).score),
            "clip_text_similarity": float(100.0 * clip.mean()), "pairs": len(outputs)}
