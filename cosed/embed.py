"""CLIP text and image embeddings (open_clip) as raw float32 encoder outputs.

The selector sees the encoder outputs before L2 normalisation, as the
reference does (norms around 10, which is what makes Eq. 7's 1/sqrt(512) a
sensible scale). Cosine measures (CLIP-I, CLIP-T, the step-1 pick) normalise
with `l2_normalize`, the one place that does.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cosed.calls import EmbedImages, EmbedTexts


FEATURES = "raw-v2"  # v2: fixed-size chunks (v1 embeddings depended on the batch they were made in)
CHUNK = 8


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (float64), for cosine similarities."""
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class ClipEmbedder:
    """open_clip encoders run in fixed-size chunks.

    On CPUs and GPUs alike a row's float result depends on the shape of the
    batch it is computed in (other kernels, other summation orders), so every
    chunk has ``chunk`` rows, zero-padded: an embedding is then the same bytes
    whatever else is embedded with it, alone in process or batched with other
    tasks' images on a shared actor.
    """

    def __init__(self, model, preprocess, tokenizer, device: torch.device, chunk: int = CHUNK):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.chunk = chunk

    @classmethod
    def load(cls, source: str, device: torch.device) -> "ClipEmbedder":
        from cosed.models.loaders import load_clip

        return cls(*load_clip(source, device), device=device)

    def _chunks(self, rows: torch.Tensor, encode) -> np.ndarray:
        out = []
        for start in range(0, len(rows), self.chunk):
            part = rows[start:start + self.chunk]
            padded = torch.cat([part, part.new_zeros((self.chunk - len(part), *part.shape[1:]))])
            out.append(encode(padded.to(self.device))[:len(part)].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self._chunks(self.tokenizer(list(texts)), lambda t: self.model.encode_text(t, normalize=False))

    @torch.no_grad()
    def images(self, images) -> np.ndarray:
        """Embed uint8 RGB images: an (N, H, W, 3) array or a list of (H, W, 3) arrays of any size."""
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        dtype = next(self.model.parameters()).dtype
        pixels = torch.stack([self.preprocess(Image.fromarray(np.asarray(img))) for img in images]).to(dtype)
        return self._chunks(pixels, lambda p: self.model.encode_image(p, normalize=False))

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])


class EmbeddingCache:
    """CLIP embeddings on disk, keyed by model name and a hash of the input.

    Training and evaluation embed the same captions and images many times
    over; each is computed once (on whatever backend) and read back after.
    The folder key includes `FEATURES`, so raw and normalised entries never mix.
    """

    def __init__(self, backend, model_name: str, folder: Path):
        self.backend = backend
        self.folder = Path(folder) / hashlib.sha256(f"{model_name}\x1f{FEATURES}".encode()).hexdigest()[:16]

    def texts(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha256(b"text\x1f" + t.encode("utf-8")).hexdigest() for t in texts]
        return self._cached(keys, lambda missing: self.backend.embed_texts(EmbedTexts(tuple(texts[i] for i in missing))))

    def images(self, images) -> np.ndarray:
        keys = [hashlib.sha256(b"image\x1f" + str(np.shape(img)).encode() + np.ascontiguousarray(img).tobytes())
                .hexdigest() for img in images]
        return self._cached(keys, lambda missing: self.backend.embed_images(
            EmbedImages(tuple(images[i] for i in missing))))

    def keyed(self, keys: list[str], compute) -> np.ndarray:
        """Embeddings under caller-made keys; ``compute(missing_indices)`` embeds only what is not cached."""
        return self._cached([hashlib.sha256(f"keyed\x1f{k}".encode()).hexdigest() for k in keys], compute)

    def _cached(self, keys: list[str], compute) -> np.ndarray:
        paths = [self.folder / key[:2] / f"{key}.npy" for key in keys]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if missing:
            for i, vector in zip(missing, compute(missing)):
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[i].with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as handle:
                    np.save(handle, np.asarray(vector, dtype=np.float32))
                os.replace(tmp, paths[i])
        return np.stack([np.load(path) for path in paths]) if paths else np.zeros((0, 0), np.float32)
