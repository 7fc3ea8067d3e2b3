"""One adapter per diffusers pipeline family, chosen by the pipeline's class name.

The engine never branches on the model: the text-to-image adapter turns the
pool's scheduler-neutral latents into what the pipeline's ``latents=`` expects
(packing them for FLUX) and turns the latents seen in ``callback_on_step_end``
back into neutral ones; the image-to-video adapter builds the call for its
pipeline. New families register here, the way open_clip registers model configs.

Scheduler-neutral scale (method.md §2): diffusers' ``prepare_latents``
multiplies given latents by ``scheduler.init_noise_sigma``. A latent captured
mid-run from an Euler-type scheduler lives at scale sqrt(sigma_k^2 + 1), so it
is divided by that scale when captured (the scheduler's own
``scale_model_input``). DDIM's scale is 1 (identity); flow-matching schedulers
(FLUX, LTX) have none.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch

from cosed.config import SDConfig, VideoConfig


def pipeline_name(pipe) -> str:
    return type(pipe).__name__


def neutral_scale(scheduler, latents: torch.Tensor, timestep) -> torch.Tensor:
    """Latents divided by the scale the scheduler gives them at its current step (identity where it has none)."""
    scale_model_input = getattr(scheduler, "scale_model_input", None)
    return latents if scale_model_input is None else scale_model_input(latents, timestep)


class TextToImageAdapter:
    """StableDiffusionPipeline: (B, C, h, w) latents from the UNet, classifier-free guidance."""

    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    size_multiple: ClassVar[int] = 8

    def denoiser(self, pipe):
        return pipe.unet

    def latent_shape(self, pipe, sd: SDConfig) -> tuple[int, int, int]:
        scale = pipe.vae_scale_factor
        return (self.denoiser(pipe).config.in_channels, sd.height // scale, sd.width // scale)

    def check(self, sd: SDConfig) -> None:
        if sd.height % self.size_multiple or sd.width % self.size_multiple:
            raise ValueError(f"sd.height and sd.width must be multiples of {self.size_multiple} for this pipeline, "
                             f"got {sd.height}x{sd.width}")

    def to_pipeline(self, pipe, neutral: torch.Tensor, sd: SDConfig) -> torch.Tensor:
        return neutral

    def to_neutral(self, pipe, latents: torch.Tensor, timestep, sd: SDConfig) -> torch.Tensor:
        return neutral_scale(pipe.scheduler, latents, timestep)

    def call_kwargs(self, sd: SDConfig, batch: int) -> dict[str, Any]:
        negative = [sd.negative_prompt] * batch if sd.negative_prompt else None
        return {"guidance_scale": sd.guidance_scale, "negative_prompt": negative}

    def encode(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) pixels in [-1, 1] as clean latents in the denoiser's space (the VAE's mode)."""
        vae = pipe.vae
        return vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float() * vae.config.scaling_factor

    def noised(self, pipe, clean: torch.Tensor, noise: torch.Tensor, sd: SDConfig, iteration: int) -> torch.Tensor:
        """``clean`` noised to where a run of this pipeline stands after ``iteration`` denoising steps (SDEdit),
        in the pool's neutral scale. A copy of the scheduler: the pipeline's own keeps its state."""
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(sd.num_inference_steps, device=clean.device)
        if iteration >= len(scheduler.timesteps):
            return clean
        timestep = scheduler.timesteps[iteration]
        noisy = scheduler.add_noise(clean, noise, timestep.reshape(1))
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = iteration  # Euler-type: the scale of that step
        return neutral_scale(scheduler, noisy, timestep)


class FluxAdapter(TextToImageAdapter):
    """FluxPipeline: packed (B, h/2 * w/2, 4C) latents, guidance-distilled (no negative prompt)."""

    load_kwargs: ClassVar[dict[str, Any]] = {}
    size_multiple: ClassVar[int] = 16
    max_sequence_length: ClassVar[int] = 256  # FLUX.1-schnell's limit

    def denoiser(self, pipe):
        return pipe.transformer

    def latent_shape(self, pipe, sd: SDConfig) -> tuple[int, int, int]:
        step = pipe.vae_scale_factor * 2
        return (pipe.transformer.config.in_channels // 4, 2 * (sd.height // step), 2 * (sd.width // step))

    def to_pipeline(self, pipe, neutral: torch.Tensor, sd: SDConfig) -> torch.Tensor:
        batch, channels, height, width = neutral.shape
        return pipe._pack_latents(neutral, batch, channels, height, width)

    def to_neutral(self, pipe, latents: torch.Tensor, timestep, sd: SDConfig) -> torch.Tensor:
        unpacked = pipe._unpack_latents(latents, sd.height, sd.width, pipe.vae_scale_factor)
        return neutral_scale(pipe.scheduler, unpacked, timestep)

    def call_kwargs(self, sd: SDConfig, batch: int) -> dict[str, Any]:
        return {"guidance_scale": sd.guidance_scale, "max_sequence_length": self.max_sequence_length}

    def encode(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        latent = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
        return (latent - vae.config.shift_factor) * vae.config.scaling_factor

    def noised(self, pipe, clean: torch.Tensor, noise: torch.Tensor, sd: SDConfig, iteration: int) -> torch.Tensor:
        """Flow matching: (1 - sigma) x0 + sigma noise at the sigma FluxPipeline's schedule (its resolution
        shift included) reaches after ``iteration`` steps; no scale."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = copy.deepcopy(pipe.scheduler)
        steps = sd.num_inference_steps
        if iteration >= steps:
            return clean
        config = scheduler.config
        mu = calculate_shift((clean.shape[2] // 2) * (clean.shape[3] // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, steps, clean.device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        sigma = scheduler.sigmas[iteration].to(clean.device, clean.dtype)
        return sigma * noise + (1 - sigma) * clean


class ImageToVideoAdapter:
    """StableVideoDiffusionPipeline: image only, fps and motion conditioning."""

    load_kwargs: ClassVar[dict[str, Any]] = {}
    keyframes: ClassVar[bool] = False  # can end a clip on a given image (`--transitions keyframe`)

    def check(self, video: VideoConfig) -> None:
        if video.height % 8 or video.width % 8:
            raise ValueError(f"video.height and video.width must be multiples of 8, got {video.height}x{video.width}")

    def call_kwargs(self, video: VideoConfig, prompt: str | None) -> dict[str, Any]:
        return {"fps": video.fps, "decode_chunk_size": video.decode_chunk_size,
                "motion_bucket_id": video.motion_bucket_id, "noise_aug_strength": video.noise_aug_strength}


class LTXAdapter(ImageToVideoAdapter):
    """LTXImageToVideoPipeline: image plus the scene's caption; sizes divisible by 32, 8k+1 frames."""

    def check(self, video: VideoConfig) -> None:
        if video.height % 32 or video.width % 32 or (video.num_frames - 1) % 8:
            raise ValueError("LTX-Video needs video.height and video.width divisible by 32 and "
                             f"video.num_frames = 8k+1, got {video.height}x{video.width}, {video.num_frames} frames")

    keyframes: ClassVar[bool] = True

    def call_kwargs(self, video: VideoConfig, prompt: str | None) -> dict[str, Any]:
        return {"prompt": prompt or "", "frame_rate": video.fps, "decode_timestep": 0.05, "decode_noise_scale": 0.025}

    def keyframe_pipeline(self, pipe):
        """LTXConditionPipeline on the loaded pipeline's own modules (no second load, no second copy)."""
        from diffusers import LTXConditionPipeline

        keyed = LTXConditionPipeline.from_pipe(pipe)
        keyed.set_progress_bar_config(disable=True)
        return keyed

    def keyframe_kwargs(self, first, last, video: VideoConfig, prompt: str | None) -> dict[str, Any]:
        """The condition pipeline's call: ``first`` at frame 0, ``last`` at the clip's last frame."""
        from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

        return {"conditions": [LTXVideoCondition(image=first, frame_index=0),
                               LTXVideoCondition(image=last, frame_index=video.num_frames - 1)],
                **self.call_kwargs(video, prompt)}


TEXT_TO_IMAGE: dict[str, TextToImageAdapter] = {
    "StableDiffusionPipeline": TextToImageAdapter(),
    "FluxPipeline": FluxAdapter(),
}
IMAGE_TO_VIDEO: dict[str, ImageToVideoAdapter] = {
    "StableVideoDiffusionPipeline": ImageToVideoAdapter(),
    "LTXImageToVideoPipeline": LTXAdapter(),
}


# Image-to-video pipelines whose model also takes text alone: the text-to-video pipeline class built from the
# same components (the t2v method). SVD has none: it is conditioned on an image only.
TEXT_TO_VIDEO: dict[str, str] = {"LTXImageToVideoPipeline": "LTXPipeline"}


def text_to_video_pipeline(pipe):
    """The text-to-video pipeline sharing ``pipe``'s loaded components (no second copy of the weights)."""
    name = pipeline_name(pipe)
    if name not in TEXT_TO_VIDEO:
        raise ValueError(f"this profile's video model ({name}) takes no text alone, so it has no text-to-video "
                         f"method: use a profile whose video model is one of {', '.join(sorted(TEXT_TO_VIDEO))}")
    import diffusers

    return getattr(diffusers, TEXT_TO_VIDEO[name])(**pipe.components)


def _lookup(registry: dict, name: str, role: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"no {role} adapter for pipeline class {name!r}: "
                         f"supported are {', '.join(sorted(registry))}") from None


def supports_keyframes(pipeline_name: str | None) -> bool:
    """Whether the image-to-video pipeline of this class can end a clip on a given image."""
    return pipeline_name in IMAGE_TO_VIDEO and IMAGE_TO_VIDEO[pipeline_name].keyframes


def text_to_image_adapter(pipe_or_name) -> TextToImageAdapter:
    name = pipe_or_name if isinstance(pipe_or_name, str) else pipeline_name(pipe_or_name)
    return _lookup(TEXT_TO_IMAGE, name, "text-to-image")


def image_to_video_adapter(pipe_or_name) -> ImageToVideoAdapter:
    name = pipe_or_name if isinstance(pipe_or_name, str) else pipeline_name(pipe_or_name)
    return _lookup(IMAGE_TO_VIDEO, name, "image-to-video")
