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


@dataclass
class RenderedBatch:
    images: np.ndarray                    # (B, H, W, 3) uint8
    captured: dict[int, np.ndarray]       # iteration -> (B, C, h, w) float16


def latent_shape(pipe, sd: SDConfig) -> tuple[int, int, int]:
    scale = pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, sd.height // scale, sd.width // scale)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding the same way everywhere."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@torch.no_grad()
def render_batch(pipe, caption: str | list[str], init_latents: np.ndarray, sd: SDConfig,
                 capture_iterations: list[int]) -> RenderedBatch:
    """Denoise each initial latent with the caption (or its own caption); return images and early latents."""
    captured: dict[int, np.ndarray] = {}
    wanted = set(capture_iterations)

    def capture(_pipe, index: int, _timestep, kwargs):
        if index + 1 in wanted:
            captured[index + 1] = kwargs["latents"].detach().to("cpu", torch.float16).numpy()
        return kwargs

    latents = torch.tensor(init_latents, dtype=pipe.unet.dtype, device=pipe.device)
    output = pipe(
        prompt=[caption] * len(init_latents) if isinstance(caption, str) else list(caption), height=sd.height, width=sd.width,
        num_inference_steps=sd.num_inference_steps, guidance_scale=sd.guidance_scale,
        latents=latents, output_type="np",
        callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents"],
    )
    return RenderedBatch(images=to_uint8(output.images), captured=captured)


def batches(count: int, batch_size: int) -> list[range]:
    """Fixed batch boundaries: a candidate's batch depends only on its index, never on worker count."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
