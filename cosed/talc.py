"""TALC's time-aligned captions (Bansal et al.) on LTX-Video: in one generation for a whole task, the video
tokens of scene i attend in cross-attention only to the text tokens of caption i.

`TimeAlignedAttnProcessor` replaces the processor of each transformer block's cross-attention (``attn2``); it
adds a (video tokens x text tokens) bias of -10000 wherever the scenes differ, on top of the text padding mask,
so a masked text token gets exactly zero weight (exp(-10000) underflows in float32 and bfloat16 alike). The
self-attention (``attn1``) keeps LTX's own processor: frames still see each other, which is what keeps the
scenes of one generation coherent. `talc_frames` runs the one generation of a task (the ``talc`` method):
scene 0 gets ``video.num_frames`` frames, every later scene ``num_frames - 1`` (LTX's 8k+1 rule for the whole).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

from cosed.config import VideoConfig

MASKED = -10000.0  # the value LTX itself uses for padded text tokens (transformer_ltx.py, encoder_attention_mask)


def scene_of_tokens(latent_frames: int, tokens_per_frame: int, scenes: int) -> torch.Tensor:
    """The scene of each video token, LTX's packing order (frame-major): latent frames split evenly over the
    scenes, earlier scenes taking the remainder."""
    frame_scene = torch.cat([torch.full((size,), i) for i, size in enumerate(_even(latent_frames, scenes))])
    return frame_scene.repeat_interleave(tokens_per_frame)


def scene_of_text(tokens_per_caption: int, scenes: int) -> torch.Tensor:
    """The scene of each text token when the captions' embeddings are concatenated, each padded to one length."""
    return torch.arange(scenes).repeat_interleave(tokens_per_caption)


def _even(total: int, parts: int) -> list[int]:
    if parts < 1 or total < parts:
        raise ValueError(f"cannot split {total} latent frames over {parts} scenes")
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class TimeAlignedAttnProcessor(LTXVideoAttnProcessor):
    """LTX's attention with scene i's video tokens restricted to caption i's text tokens (cross-attention only)."""

    def __init__(self, video_scene: torch.Tensor, text_scene: torch.Tensor):
        super().__init__()
        self.video_scene = video_scene
        self.text_scene = text_scene

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:  # self-attention: unchanged
            return super().__call__(attn, hidden_states, None, attention_mask, image_rotary_emb)
        if hidden_states.shape[1] != len(self.video_scene) or encoder_hidden_states.shape[1] != len(self.text_scene):
            raise ValueError(f"time-aligned mask is for {len(self.video_scene)} video x {len(self.text_scene)} text "
                             f"tokens, got {hidden_states.shape[1]} x {encoder_hidden_states.shape[1]}")
        same = self.video_scene.to(hidden_states.device)[:, None] == self.text_scene.to(hidden_states.device)[None]
        bias = torch.zeros(same.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        bias = bias.masked_fill(~same, MASKED)[None]                         # (1, video, text)
        if attention_mask is not None:                                        # LTX's padding bias: (B, 1, text)
            bias = bias + attention_mask.to(bias.dtype)
        bias = bias.expand(hidden_states.shape[0], -1, -1)
        return super().__call__(attn, hidden_states, encoder_hidden_states, bias, image_rotary_emb)


def install(transformer, video_scene: torch.Tensor, text_scene: torch.Tensor) -> dict:
    """Put the time-aligned processor on every block's cross-attention; returns the processors it replaced
    (give them back with `restore`)."""
    replaced = {}
    for index, block in enumerate(transformer.transformer_blocks):
        replaced[index] = block.attn2.processor
        block.attn2.set_processor(TimeAlignedAttnProcessor(video_scene, text_scene))
    return replaced


def restore(transformer, replaced: dict) -> None:
    for index, processor in replaced.items():
        transformer.transformer_blocks[index].attn2.set_processor(processor)


def scene_frames(num_frames: int, scenes: int) -> list[range]:
    """Each scene's pixel frames in the one video: the first ``num_frames``, then ``num_frames - 1`` each."""
    bounds = [0] + [num_frames + i * (num_frames - 1) for i in range(scenes)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def latent_frame_scenes(num_frames: int, scenes: int, temporal_ratio: int) -> torch.Tensor:
    """The scene of each latent frame: that of the first pixel frame it encodes (latent 0 is pixel frame 0,
    latent f >= 1 pixel frames (f-1)*ratio + 1 ... f*ratio, as LTX's causal VAE packs them)."""
    total = scenes * (num_frames - 1) + 1
    owner = torch.zeros(total, dtype=torch.long)
    for scene, frames in enumerate(scene_frames(num_frames, scenes)):
        owner[frames.start:frames.stop] = scene
    latents = (total - 1) // temporal_ratio + 1
    return torch.stack([owner[0 if f == 0 else (f - 1) * temporal_ratio + 1] for f in range(latents)])


@torch.no_grad()
def talc_frames(pipe, captions: list[str], seed: int, video: VideoConfig, max_sequence_length: int = 128) -> np.ndarray:
    """One LTX-Video text-to-video generation for all scenes: (frames, H, W, 3) uint8, scene i's frames
    conditioned on caption i only (the unconditional branch likewise on its own empty caption per scene)."""
    from cosed.generate import to_uint8
    from cosed.models.adapters import image_to_video_adapter
    from cosed.numerics import guarded
    from cosed.seeds import generator

    adapter = image_to_video_adapter("LTXImageToVideoPipeline")
    adapter.check(video)
    scenes = len(captions)
    total = scenes * (video.num_frames - 1) + 1
    encoded = [pipe.encode_prompt(c, negative_prompt="", max_sequence_length=max_sequence_length,
                                  device=pipe._execution_device) for c in captions]
    embeds = [torch.cat([e[k] for e in encoded], dim=1) for k in range(4)]
    latent_scene = latent_frame_scenes(video.num_frames, scenes, pipe.vae_temporal_compression_ratio)
    per_frame = (video.height // pipe.vae_spatial_compression_ratio // pipe.transformer_spatial_patch_size) * (
        video.width // pipe.vae_spatial_compression_ratio // pipe.transformer_spatial_patch_size)
    replaced = install(pipe.transformer, latent_scene.repeat_interleave(per_frame),
                       scene_of_text(max_sequence_length, scenes))
    kwargs = {k: v for k, v in adapter.call_kwargs(video, None).items() if k != "prompt"}
    try:
        def call():
            return pipe(prompt_embeds=embeds[0], prompt_attention_mask=embeds[1], negative_prompt_embeds=embeds[2],
                        negative_prompt_attention_mask=embeds[3], height=video.height, width=video.width,
                        num_frames=total, num_inference_steps=video.num_inference_steps, generator=generator(seed),
                        output_type="np", max_sequence_length=max_sequence_length, **kwargs)

        output = guarded(pipe, "TALC text-to-video (LTXPipeline)", call, lambda out: np.asarray(out.frames[0])[None])
    finally:
        restore(pipe.transformer, replaced)
    return to_uint8(np.asarray(output.frames[0]))
