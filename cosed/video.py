"""Image-to-video (Stable Video Diffusion) and H.264 mp4 encoding with PyAV."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import torch
from PIL import Image

from cosed.config import VideoConfig
from cosed.generate import to_uint8
from cosed.models.adapters import image_to_video_adapter
from cosed.numerics import guarded
from cosed.seeds import generator


@torch.no_grad()
def animate(pipe, image: np.ndarray, seed: int, video: VideoConfig, prompt: str | None = None) -> np.ndarray:
    """One scene's clip: (frames, H, W, 3) uint8 from the chosen image, seeded.

    The pipeline's adapter (`cosed.models.adapters`) adds its own arguments;
    ``prompt`` (the scene's caption) is used by pipelines that take text (LTX-Video).
    """
    adapter = image_to_video_adapter(pipe)
    adapter.check(video)
    still = Image.fromarray(image).resize((video.width, video.height), Image.Resampling.BICUBIC)

    def call():
        return pipe(
            image=still, height=video.height, width=video.width, num_frames=video.num_frames,
            num_inference_steps=video.num_inference_steps, generator=generator(seed), output_type="np",
            **adapter.call_kwargs(video, prompt),
        )

    output = guarded(pipe, f"image-to-video ({type(pipe).__name__})", call,
                     lambda out: np.asarray(out.frames[0])[None])
    return to_uint8(np.asarray(output.frames[0]))


def encode_mp4(frames: np.ndarray, fps: int, metadata: dict[str, str] | None = None) -> bytes:
    """H.264 (yuv420p) mp4 bytes from (N, H, W, 3) uint8 frames; H and W must be even."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        for key, value in (metadata or {}).items():
            container.metadata[key] = value
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedClip:
    """One scene's clip as H.264 mp4 bytes: what moves between processes instead of raw frames."""

    data: bytes
    frames: int


def encode_clip(frames: np.ndarray, fps: int) -> EncodedClip:
    return EncodedClip(data=encode_mp4(frames, fps), frames=len(frames))


def concat_mp4(clips: list[bytes], metadata: dict[str, str] | None = None) -> bytes:
    """One mp4 from clips encoded alike (same size, fps, codec), hard cuts, without re-encoding.

    Packets are copied with their timestamps shifted by the duration of the
    clips before them, so memory stays at the size of the encoded clips.
    """
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        for key, value in (metadata or {}).items():
            output.metadata[key] = value
        stream = None
        offset = 0
        for data in clips:
            with av.open(io.BytesIO(data), mode="r") as source:
                template = source.streams.video[0]
                if stream is None:
                    stream = output.add_stream_from_template(template)
                end = offset
                for packet in source.demux(template):
                    if packet.dts is None:  # the demuxer's final flush packet
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    end = max(end, packet.pts + (packet.duration or 0))
                    packet.stream = stream
                    output.mux(packet)
                offset = end
    return buffer.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def stitch(clips: list[np.ndarray], crossfade_frames: int = 0) -> np.ndarray:
    """Clips in step order, hard cuts by default or a short linear cross-fade."""
    if crossfade_frames <= 0:
        return np.concatenate(clips)
    out = [clips[0]]
    for clip in clips[1:]:
        n = min(crossfade_frames, len(out[-1]), len(clip))
        alpha = np.linspace(0, 1, n + 2)[1:-1, None, None, None]
        blend = (out[-1][-n:] * (1 - alpha) + clip[:n] * alpha).round().astype(np.uint8)
        out[-1] = out[-1][:-n]
        out += [blend, clip[n:]]
    return np.concatenate(out)
