"""Image-to-video (Stable Video Diffusion) and H.264 mp4 encoding with PyAV."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from fractions import Fraction
from typing import Callable, Iterable, Iterator

import av
import numpy as np
import torch
from PIL import Image

from cosed import storage
from cosed.calls import ClipDone, ClipRequest
from cosed.config import VideoConfig
from cosed.generate import to_uint8
from cosed.images import png_image
from cosed.models.adapters import TEXT_TO_VIDEO, image_to_video_adapter
from cosed.numerics import guarded
from cosed.seeds import generator
from cosed.transitions import shared_frames


@torch.no_grad()
def animate(pipe, image: np.ndarray, seed: int, video: VideoConfig, prompt: str | None = None,
            last: np.ndarray | None = None, keyed=None) -> np.ndarray:
    """One scene's clip: (frames, H, W, 3) uint8 from the chosen image, seeded.

    The pipeline's adapter (`cosed.models.adapters`) adds its own arguments;
    ``prompt`` (the scene's caption) is used by pipelines that take text (LTX-Video).
    ``last`` (`--transitions keyframe`: the next scene's image) also pins the clip's last frame; it runs on
    ``keyed``, the adapter's keyframe pipeline built on ``pipe``'s modules.
    """
    adapter = image_to_video_adapter(pipe)
    adapter.check(video)

    def resized(array: np.ndarray) -> Image.Image:
        return Image.fromarray(array).resize((video.width, video.height), Image.Resampling.BICUBIC)

    still = resized(image)
    if last is not None and not adapter.keyframes:
        raise ValueError(f"{type(pipe).__name__} takes one image: it cannot end a clip on the next scene")
    runner, kwargs = (pipe, {"image": still, **adapter.call_kwargs(video, prompt)}) if last is None else (
        keyed or adapter.keyframe_pipeline(pipe), adapter.keyframe_kwargs(still, resized(last), video, prompt))

    return _clip_frames(runner, "image-to-video", seed, video, kwargs)


def _clip_frames(pipe, what: str, seed: int, video: VideoConfig, kwargs: dict) -> np.ndarray:
    """The one call of a video pipeline, shared by image-to-video and text-to-video: size, frames, steps and
    seed from ``video``; ``kwargs`` what the adapter adds; numerics guarded as every model call is."""

    def call():
        return pipe(height=video.height, width=video.width, num_frames=video.num_frames,
                    num_inference_steps=video.num_inference_steps, generator=generator(seed), output_type="np",
                    **kwargs)

    output = guarded(pipe, f"{what} ({type(pipe).__name__})", call, lambda out: np.asarray(out.frames[0])[None])
    return to_uint8(np.asarray(output.frames[0]))


def text_to_video(pipe, prompt: str, seed: int, video: VideoConfig) -> np.ndarray:
    """One scene's clip from its caption alone (the t2v method): ``pipe`` is the text-to-video pipeline
    (`cosed.models.adapters.text_to_video_pipeline`); the image-to-video adapter's text arguments apply."""
    image_to_video = {t2v: i2v for i2v, t2v in TEXT_TO_VIDEO.items()}
    adapter = image_to_video_adapter(image_to_video.get(type(pipe).__name__, type(pipe).__name__))
    adapter.check(video)
    return _clip_frames(pipe, "text-to-video", seed, video, adapter.call_kwargs(video, prompt))


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame as planar yuv420p (BT.601, limited range), in exact integer math.

    swscale is not bit-exact across its SIMD paths (which one runs depends on the
    CPU), so the same frames could give other bytes on another node; this depends on
    the pixel values alone. Chroma is the rounded mean of each 2x2 block.
    """
    rgb = frame.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    height, width = frame.shape[:2]
    quads = rgb.reshape(height // 2, 2, width // 2, 2, 3).sum(axis=(1, 3))  # 2x2 sums, chroma sited centrally
    r4, g4, b4 = quads[..., 0], quads[..., 1], quads[..., 2]
    u = ((-38 * r4 - 74 * g4 + 112 * b4 + 512) >> 10) + 128
    v = ((112 * r4 - 94 * g4 - 18 * b4 + 512) >> 10) + 128
    planes = [np.clip(p, 0, 255).astype(np.uint8) for p in (y, u, v)]
    return np.concatenate([planes[0], planes[1].reshape(height // 4, width), planes[2].reshape(height // 4, width)])


def write_mp4(fill: Callable[[av.container.OutputContainer], None], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a new mp4 that ``fill`` muxes into, with its index (``moov``) first.

    Faststart lets a browser play a clip or video straight from a bucket without
    fetching the end of the file first. The muxer moves the index in a second pass
    over a real file, so the file lives for a moment in a temporary folder.
    """
    with tempfile.TemporaryDirectory(prefix="cosed-mp4-") as folder:
        path = os.path.join(folder, "out.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            for key, value in (metadata or {}).items():
                container.metadata[key] = value
            fill(container)
        with open(path, "rb") as handle:
            return handle.read()


def encode_mp4(frames: np.ndarray | Iterable[np.ndarray], fps: int, metadata: dict[str, str] | None = None) -> bytes:
    """H.264 (yuv420p) mp4 bytes from (N, H, W, 3) uint8 frames; H and W must be even.

    Byte-reproducible in any process and on any node, which the Ray path needs (a
    clip re-rendered elsewhere, or by another worker, must equal the first):
    - x264's macroblock-tree rate control gave different bytes for the same frames
      in about 1 encode of 50, more often under load (``mbtree=0``: identical in
      every one of 600 encodes, also with the CPU saturated);
    - one thread and one lookahead thread: slices and frame threads follow the
      thread count, which would otherwise follow the machine's cores;
    - the colour conversion is ours (`rgb_to_yuv420p`).
    A 25-frame 1024x576 clip takes about 2 s on one core of the 2-core team machine.
    """
    def fill(container) -> None:
        stream = None
        for frame in frames:  # an array, or frames one by one (`dissolve_mp4`)
            if stream is None:
                stream = container.add_stream("libx264", rate=Fraction(fps))
                stream.height, stream.width = frame.shape[0], frame.shape[1]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "18", "x264-params": "threads=1:lookahead-threads=1:mbtree=0"}
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")))
        container.mux(stream.encode(None))

    return write_mp4(fill, metadata)


def concat_mp4(clips: list[bytes], metadata: dict[str, str] | None = None) -> bytes:
    """One mp4 from clips encoded alike (same size, fps, codec), hard cuts, without re-encoding.

    Packets are copied with their timestamps shifted by the duration of the
    clips before them, so memory stays at the size of the encoded clips.
    """
    def fill(output) -> None:
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

    return write_mp4(fill, metadata)


class SceneMismatch(ValueError):
    """A clip request's scene bytes are not the ones it names: animating them would give a wrong clip."""


def scene_image(request: ClipRequest) -> np.ndarray:
    """The scene a clip animates, checked against the request's hash (a mismatch is fatal for the call)."""
    return _checked_scene(request, request.scene, request.scene_sha256)


def next_scene_image(request: ClipRequest) -> np.ndarray | None:
    """The next scene's image a keyframe clip ends on, checked the same way; None when the request has none."""
    return _checked_scene(request, request.next_scene, request.next_scene_sha256) if request.next_scene else None


def _checked_scene(request: ClipRequest, uri: str, sha256: str) -> np.ndarray:
    data = storage.read_bytes(uri)
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise SceneMismatch(f"scene {uri} of task {request.task_id} step {request.step} has sha256 "
                            f"{found}, the clip request names {sha256 or 'none'}: not animated")
    return png_image(data)


def write_clip(request: ClipRequest, frames: np.ndarray) -> ClipDone:
    """Encode a scene's clip and store it where its request says (a repeated write stores the same bytes)."""
    data = encode_mp4(frames, request.video.fps)
    storage.write_bytes(request.clip, data)
    return ClipDone(clip=request.clip, size=len(data), frames=len(frames))


def existing_clip(request: ClipRequest) -> ClipDone | None:
    """The clip a retry or a resume finds already stored (parts are keyed by the task's fingerprint)."""
    size = storage.size(request.clip)
    return None if size is None else ClipDone(clip=request.clip, size=size, frames=0, reused=True)


def count_frames(data: bytes) -> int:
    """Frames of an mp4's video stream, counted from its packets (nothing is decoded)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_mp4(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), mode="r") as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def stitch(clips: list[np.ndarray], crossfade_frames: int = 0) -> np.ndarray:
    """Clips in step order, hard cuts by default or a short linear cross-fade."""
    if crossfade_frames <= 0:
        return np.concatenate(clips)
    return np.stack(list(dissolved(iter(clips), crossfade_frames)))


def dissolved(clips: Iterator[np.ndarray], overlap: int) -> Iterator[np.ndarray]:
    """The frames of clips in order, the last ``overlap`` frames of each cross-fading linearly into the first
    ones of the next, in exact uint8 arithmetic; one clip held at a time. A boundary takes at most half of
    either clip (`cosed.transitions.shared_frames`), so no frame is in two dissolves."""
    pending = next(clips, None)
    length = 0 if pending is None else len(pending)
    for clip in clips:
        n = shared_frames(overlap, length, len(clip))
        if n:
            yield from pending[:-n]
            alpha = np.linspace(0, 1, n + 2)[1:-1, None, None, None]
            yield from (pending[-n:] * (1 - alpha) + clip[:n] * alpha).round().astype(np.uint8)
        else:
            yield from pending
        pending, length = clip[n:], len(clip)
    if pending is not None:
        yield from pending


def dissolve_mp4(clips: list[bytes], overlap: int, fps: int, metadata: dict[str, str] | None = None) -> bytes:
    """One mp4 from encoded clips with a cross-fade of ``overlap`` frames at each boundary, re-encoded.

    H.264 decoding is exact (the standard fixes every output bit) and the blend and encoder are ours
    (`encode_mp4`), so the bytes are as reproducible as a clip's. Holds one clip's decoded frames at a time.
    """
    return encode_mp4(dissolved((decode_mp4(data) for data in clips), overlap), fps, metadata)
