"""Candidate generation: one batched text-to-image run from given initial latents.

All candidates of a batch share the caption and go through the UNet together.
The latents after the first denoising iterations are captured with diffusers'
``callback_on_step_end`` so the chosen run can seed later steps' pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cosed.config import SDConfig
from cosed.models.adapters import text_to_image_adapter
from cosed.numerics import guarded
from cosed.seeds import gaussian_latent


@dataclass
class RenderedBatch:
    images: np.ndarray                    # (B, H, W, 3) uint8
    captured: dict[int, np.ndarray]       # iteration -> (B, C, h, w) float16


def latent_shape(pipe, sd: SDConfig) -> tuple[int, int, int]:
    """The scheduler-neutral latent shape of one candidate (unpacked, also for FLUX)."""
    return text_to_image_adapter(pipe).latent_shape(pipe, sd)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding the same way everywhere."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@torch.no_grad()
def render_batch(pipe, caption: str | list[str], init_latents: np.ndarray, sd: SDConfig,
                 capture_iterations: list[int]) -> RenderedBatch:
    """Denoise each initial latent with the caption (or its own caption); return images and early latents.

    ``init_latents`` and the captured latents are in the pool's scheduler-neutral scale;
    the pipeline's adapter converts both ways.
    """
    adapter = text_to_image_adapter(pipe)
    adapter.check(sd)
    prompts = [caption] * len(init_latents) if isinstance(caption, str) else list(caption)
    captured: dict[int, np.ndarray] = {}
    wanted = set(capture_iterations)

    def capture(_pipe, index: int, timestep, kwargs):
        if index + 1 in wanted:
            neutral = adapter.to_neutral(_pipe, kwargs["latents"], timestep, sd)
            captured[index + 1] = neutral.detach().to("cpu", torch.float16).numpy()
        return kwargs

    def call():
        captured.clear()
        denoiser = adapter.denoiser(pipe)
        neutral = torch.tensor(init_latents, dtype=denoiser.dtype, device=pipe._execution_device)
        return pipe(
            prompt=prompts, height=sd.height, width=sd.width, num_inference_steps=sd.num_inference_steps,
            latents=adapter.to_pipeline(pipe, neutral, sd), output_type="np",
            callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"],
            **adapter.call_kwargs(sd, len(prompts)),
        )

    output = guarded(pipe, f"text-to-image ({type(pipe).__name__})", call, lambda out: out.images)
    return RenderedBatch(images=to_uint8(output.images), captured=captured)


@torch.no_grad()
def encode_scene(pipe, image: np.ndarray, sd: SDConfig, iterations: list[int], seed: int) -> dict[int, np.ndarray]:
    """The user's scene image (uint8, at the text-to-image size) as pool latents: VAE-encoded, then noised with
    one seeded draw to each captured iteration's timestep (SDEdit); iteration -> (C, h, w) float16, neutral."""
    adapter = text_to_image_adapter(pipe)
    device = pipe._execution_device
    pixels = torch.tensor(np.ascontiguousarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0
    clean = adapter.encode(pipe, pixels.to(device))
    expected = adapter.latent_shape(pipe, sd)
    if tuple(clean.shape[1:]) != tuple(expected):
        raise ValueError(f"the scene image encodes to {tuple(clean.shape[1:])}, the pool holds {tuple(expected)}")
    noise = gaussian_latent(seed, tuple(clean.shape[1:]))[None].to(device)
    return {k: adapter.noised(pipe, clean, noise, sd, k)[0].to("cpu", torch.float16).numpy() for k in iterations}


def batches(count: int, batch_size: int) -> list[range]:
    """Fixed batch boundaries: a candidate's batch depends only on its index, never on worker count."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
