"""CLIP text and image embeddings (open_clip), L2-normalised float32 arrays."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ClipEmbedder:
    def __init__(self, model, preprocess, tokenizer, device: torch.device, batch_size: int = 32):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def load(cls, source: str, device: torch.device) -> "ClipEmbedder":
        from cosed.models.loaders import load_clip

        return cls(*load_clip(source, device), device=device)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def images(self, images: np.ndarray) -> np.ndarray:
        """Embed (N, H, W, 3) uint8 images."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(img)) for img in images[start:start + self.batch_size]])
            dtype = next(self.model.parameters()).dtype
            out.append(self.model.encode_image(pixels.to(self.device, dtype), normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])
