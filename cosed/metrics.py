"""CLIP-T and CLIP-I (method.md §7, paper Table 3): cosines of CLIP embeddings (raw inputs are normalised here)."""

from __future__ import annotations

import numpy as np

from cosed.embed import l2_normalize


def clip_t(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Text adherence: mean over steps of 100 * cos(image_i, step text_i)."""
    images = l2_normalize(image_embeddings)
    texts = l2_normalize(text_embeddings)
    return float(100.0 * np.mean(np.sum(images * texts, axis=1)))


def clip_i_to(image_embeddings: np.ndarray, reference: np.ndarray) -> float:
    """Mean over scenes of 100 * cos(scene, reference): how close the scenes stay to one image (the user's)."""
    return float(100.0 * (l2_normalize(image_embeddings) @ l2_normalize(reference[None])[0]).mean())


def clip_i(image_embeddings: np.ndarray) -> float | None:
    """Sequence similarity: mean over pairs i<j of 100 * cos(image_i, image_j); None below two scenes."""
    images = l2_normalize(image_embeddings)
    if len(images) < 2:
        return None
    gram = images @ images.T
    upper = np.triu_indices(len(images), k=1)
    return float(100.0 * gram[upper].mean())
