"""The contrastive selector (method.md §4, paper Eqs. 7-8).

Scenes are CLIP text and image embeddings projected by four 512->256 maps:
``next_*`` for candidates of the current step, ``past_*`` for chosen scenes of
earlier steps. A candidate scores the sum over past scenes of its softmax
probability among all candidates, so it wins by matching *some* earlier scene
well rather than all of them a little.

Inputs are raw CLIP encoder outputs (not L2-normalised, as in the reference);
training (`cosed.train`) optimises this same decision, and a temperature it
used is stored in the checkpoint and divides the Eq. 7 logits here too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cosed import storage
from cosed.embed import l2_normalize

EMBED_DIM = 512
PROJ_DIM = 256
SELECTOR_MODES = ("full", "text", "image", "clip")


def softmax_over_candidates(similarity: np.ndarray) -> np.ndarray:
    """p(c | j): softmax along axis 0 (candidates) of a (candidates, past) similarity matrix."""
    shifted = similarity - similarity.max(axis=0, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=0, keepdims=True)


def contrastive_scores(similarity: np.ndarray) -> np.ndarray:
    """Eq. 8: score(c) = sum_j p(c | j)."""
    return softmax_over_candidates(np.asarray(similarity, dtype=np.float64)).sum(axis=1)


def plain_clip_scores(next_text, next_image, past_text, past_image) -> np.ndarray:
    """The ``clip`` mode: sum over past scenes of cos(text) + cos(image), no projections, no softmax."""
    nt, nv, pt, pv = (l2_normalize(a) for a in (next_text, next_image, past_text, past_image))
    return (nt @ pt.T + nv @ pv.T).sum(axis=1)


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header), without loading tensors."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__", {}) or {}


class ContrastiveSelector(nn.Module):
    """``temperature`` divides the Eq. 7 logits; 1 is the paper's rule, a trained value comes from the checkpoint."""

    def __init__(self, embed_dim: int = EMBED_DIM, proj_dim: int = PROJ_DIM, temperature: float = 1.0):
        super().__init__()
        self.next_text = nn.Linear(embed_dim, proj_dim, bias=False)
        self.next_image = nn.Linear(embed_dim, proj_dim, bias=False)
        self.past_text = nn.Linear(embed_dim, proj_dim, bias=False)
        self.past_image = nn.Linear(embed_dim, proj_dim, bias=False)
        self.scale = 1.0 / math.sqrt(2 * proj_dim)
        self.temperature = float(temperature)

    @classmethod
    def untrained(cls, seed: int = 0) -> "ContrastiveSelector":
        """Next and past maps share one seeded orthonormal-row matrix per modality.

        W^T W is then a projection onto a random half of CLIP space, so
        sim(c, j) ~ (<t_c, t_j> + <v_c, v_j>) / (2 sqrt(512)): Eq. 8 applied to
        the plain inner products of the raw CLIP features (norms ~10, so the
        softmax sees logits of a few units, not a near-linear +-0.05), and
        selection is sensible before any training.
        """
        selector = cls()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for next_map, past_map in ((selector.next_text, selector.past_text),
                                       (selector.next_image, selector.past_image)):
                q, _ = torch.linalg.qr(torch.randn(next_map.in_features, next_map.out_features, generator=gen))
                next_map.weight.copy_(q.T)
                past_map.weight.copy_(q.T)
        return selector.eval()

    def next_scene(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.next_text(text), self.next_image(image)], dim=-1)

    def past_scene(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.past_text(text), self.past_image(image)], dim=-1)

    def similarity(self, next_text, next_image, past_text, past_image, mode: str = "full") -> torch.Tensor:
        """Eq. 7 over the temperature: (candidates, past) logits.

        ``text`` and ``image`` modes keep only that modality's half of the
        concatenated scene (the reference's text-only / image-only switches).
        """
        if mode == "text":
            inner = self.next_text(next_text) @ self.past_text(past_text).T
        elif mode == "image":
            inner = self.next_image(next_image) @ self.past_image(past_image).T
        elif mode == "full":
            inner = self.next_scene(next_text, next_image) @ self.past_scene(past_text, past_image).T
        else:
            raise ValueError(f"selector mode {mode!r} has no Eq. 7 logits: use full, text or image")
        return inner * (self.scale / self.temperature)

    @torch.no_grad()
    def score(self, next_text: np.ndarray, next_image: np.ndarray,
              past_text: np.ndarray, past_image: np.ndarray, mode: str = "full") -> np.ndarray:
        """Eq. 8 scores of each candidate against all past scenes (``clip`` mode: plain CLIP sums)."""
        if mode not in SELECTOR_MODES:
            raise ValueError(f"unknown selector mode {mode!r}: use {', '.join(SELECTOR_MODES)}")
        if mode == "clip":
            return plain_clip_scores(next_text, next_image, past_text, past_image)
        as_tensor = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        sim = self.similarity(as_tensor(next_text), as_tensor(next_image), as_tensor(past_text), as_tensor(past_image),
                              mode)
        return contrastive_scores(sim.double().numpy())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, uri: str | Path, metadata: dict | None = None) -> None:
        """A safetensors checkpoint at a local path or s3:// URI."""
        from safetensors.torch import save

        meta = {"format": "cosed-selector-v1", **{k: json.dumps(v) for k, v in (metadata or {}).items()},
                "temperature": json.dumps(self.temperature)}
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        storage.write_bytes(str(uri), save(state, metadata=meta))

    @classmethod
    def from_path(cls, uri: str | Path | None) -> "ContrastiveSelector":
        """The checkpoint at ``uri``, or the untrained selector when there is none."""
        return cls.load(uri) if uri else cls.untrained()

    @classmethod
    def load(cls, uri: str | Path) -> "ContrastiveSelector":
        from safetensors.torch import load

        try:
            data = storage.read_bytes(str(uri))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"selector checkpoint not found: {uri}") from exc
        state = load(data)
        temperature = float(json.loads(read_metadata(data).get("temperature", "1.0")))
        selector = cls(embed_dim=state["next_text.weight"].shape[1], proj_dim=state["next_text.weight"].shape[0],
                       temperature=temperature)
        selector.load_state_dict(state)
        return selector.eval()


def clip_pick_scores(image_embeddings: np.ndarray, caption_embedding: np.ndarray) -> np.ndarray:
    """Step 1 (Appendix E): cosine of each candidate image with the caption."""
    return l2_normalize(image_embeddings) @ l2_normalize(caption_embedding)
