"""The user's own scene image (a task's ``scene_image``): step 0 of the sequence, never a scene of the video.

It is read once per task (a local path or an s3:// URI, PNG or JPEG), checked, and named by the sha256 of its
bytes: the task's fingerprint and manifest carry that hash, so other bytes under the same name redo the task.
The engine VAE-encodes it, noises it to each pool iteration's timestep (as SDEdit starts from an image) and
adds it to the latent pool as step 0, and adds its CLIP embedding to the selector's past scenes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cosed import storage
from cosed.calls import EmbedImages, EncodeScene
from cosed.config import RunConfig
from cosed.images import png_bytes
from cosed.parts import TaskParts
from cosed.seeds import derive_seed
from cosed.tasks import InvalidTask, Task, TaskError, TaskSet

SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def decode(data: bytes, uri: str) -> np.ndarray:
    """(H, W, 3) uint8 pixels of PNG or JPEG bytes; InvalidTask (field ``scene_image``) for anything else."""
    if not any(data.startswith(magic) for magic in SIGNATURES):
        raise InvalidTask("scene_image", f"{uri} is not a PNG or JPEG image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidTask("scene_image", f"{uri} cannot be decoded as PNG or JPEG ({type(exc).__name__})") from None


def checked(uri: str) -> tuple[str, int, int]:
    """(sha256, width, height) of a readable, decodable scene image; InvalidTask when it is missing or bad."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InvalidTask("scene_image", f"{uri} not found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise InvalidTask("scene_image", f"{uri} cannot be read: {exc}") from None
    pixels = decode(data, uri)
    return hashlib.sha256(data).hexdigest(), pixels.shape[1], pixels.shape[0]


def sha256(task: Task) -> str | None:
    """The task's scene image's content hash (None without one)."""
    return checked(task.scene_image)[0] if task.scene_image else None


def with_checked_images(task_set: TaskSet) -> TaskSet:
    """The tasks whose scene image (if any) can be read and decoded; the others become their own task errors."""
    kept, errors = [], list(task_set.errors)
    for task in task_set.tasks:
        try:
            sha256(task)
        except InvalidTask as exc:
            errors.append(TaskError(source=task.scene_image, reason=exc.reason, task_id=task.id, field=exc.field))
            continue
        kept.append(task)
    return TaskSet(tasks=kept, errors=errors)


def load(uri: str, width: int, height: int) -> tuple[np.ndarray, str]:
    """The scene image at the text-to-image size (bicubic, as clips resize scenes) and its bytes' sha256."""
    data = storage.read_bytes(uri)
    pixels = decode(data, uri)
    resized = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
    return resized, hashlib.sha256(data).hexdigest()


@dataclass
class UserScene:
    """The task's own scene image as step 0: its pool latents and CLIP embedding."""

    sha256: str  # of the image file's bytes (its stored PNG at the text-to-image size is named by it)
    captured: dict[int, np.ndarray]
    embedding: np.ndarray


def user_scene(task: Task, backend, cfg: RunConfig, parts: TaskParts | None) -> UserScene | None:
    """Step 0 from the task's scene image: at the text-to-image size, VAE-encoded and noised to each pool
    iteration (one SD-pool call) and embedded by CLIP; its PNG is stored with the task's parts."""
    if not task.scene_image:
        return None
    image, digest = load(task.scene_image, cfg.sd.width, cfg.sd.height)
    captured = backend.encode_scene(EncodeScene(image, cfg.sd, tuple(cfg.pool.iterations),
                                                derive_seed(cfg.seed, task.id, 0, "scene-image")))
    embedding = backend.embed_images(EmbedImages((image,)))[0]
    if parts is not None and not storage.exists(parts.scene(0, digest)):
        storage.write_bytes(parts.scene(0, digest), png_bytes(image))
    return UserScene(digest, captured, embedding)
