"""A chosen step and its checkpoint: what later steps need, stored as soon as the step is chosen.

Per step the task's parts (`cosed.parts`) get the chosen scene (PNG, named by its
sha256, written once), the chosen run's captured pool latents and the scene's
image embedding (safetensors: float16 latents and float32 embeddings round-trip
bit for bit, no pickle), and the step's record (JSON, written last: a step is
stored exactly when its record exists). `load_steps` gives back the stored prefix
of a task, so a retry or a resume continues at the first step not stored and
spends no model call on the steps before it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load, save

from cosed import storage
from cosed.images import png_image
from cosed.latents import CandidateSource
from cosed.parts import TaskParts

EMBEDDING = "image_embedding"


@dataclass
class StepResult:
    number: int
    text: str
    caption: str
    sources: list[CandidateSource]
    scores: list[float]
    chosen: int
    image: np.ndarray
    image_embedding: np.ndarray
    video_seed: int
    fresh_keys: list[CandidateSource] = field(default_factory=list)
    candidate_images: list[str] | None = None  # task-relative paths of the kept thumbnails
    scene_sha256: str = ""  # of the stored scene PNG: names the scene's and its clip's files

    def record(self) -> dict:
        """This step in the sequence record (and so in the manifest)."""
        candidates = [{"source": s.to_dict(), "score": score} for s, score in zip(self.sources, self.scores)]
        for entry, path in zip(candidates, self.candidate_images or []):
            entry["image"] = path
        return {"step": self.number, "text": self.text, "caption": self.caption, "candidates": candidates,
                "chosen": self.chosen, "video_seed": self.video_seed,
                **({"fresh_keys": [s.to_dict() for s in self.fresh_keys]} if self.fresh_keys else {}),
                "scene_sha256": self.scene_sha256}

    @classmethod
    def from_record(cls, record: dict, image: np.ndarray, image_embedding: np.ndarray) -> "StepResult":
        """The inverse of `record`, given the stored scene and its embedding."""
        candidates = record["candidates"]
        kept = [c["image"] for c in candidates if "image" in c] or None
        return cls(number=record["step"], text=record["text"], caption=record["caption"],
                   sources=[CandidateSource(**c["source"]) for c in candidates],
                   scores=[c["score"] for c in candidates], chosen=record["chosen"], image=image,
                   image_embedding=image_embedding, video_seed=record["video_seed"],
                   fresh_keys=[CandidateSource(**s) for s in record.get("fresh_keys", [])],
                   candidate_images=kept, scene_sha256=record["scene_sha256"])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_scene(parts: TaskParts, step: int, data: bytes) -> str:
    """Store a chosen scene's PNG once under its content's name; its sha256."""
    digest = sha256(data)
    uri = parts.scene(step, digest)
    if not storage.exists(uri):  # write-once: a name holds one content only, so a repeat would change nothing
        storage.write_bytes(uri, data)
    return digest


def store_step(parts: TaskParts, step: StepResult, captured: dict[int, np.ndarray]) -> None:
    """The step's checkpoint: its tensors first, its record last (the record marks the step stored)."""
    tensors = {f"latent_{iteration}": np.ascontiguousarray(latent, dtype=np.float16)
               for iteration, latent in captured.items()}
    tensors[EMBEDDING] = np.ascontiguousarray(step.image_embedding)
    storage.write_bytes(parts.step_tensors(step.number), save(tensors))
    storage.write_text(parts.step_record(step.number), json.dumps(step.record(), ensure_ascii=False) + "\n")


def load_steps(parts: TaskParts, count: int) -> list[tuple[StepResult, dict[int, np.ndarray]]]:
    """The stored steps 1..k of a task (k <= ``count``), each with its captured latents: stops at the first
    step whose checkpoint is missing or unreadable (that step and the later ones are chosen again)."""
    stored = []
    for number in range(1, count + 1):
        try:
            record = json.loads(storage.read_bytes(parts.step_record(number)))
            data = storage.read_bytes(parts.step_tensors(number))
            scene = storage.read_bytes(parts.scene(number, record["scene_sha256"]))
            tensors = load(data)
        except FileNotFoundError:
            break
        except Exception as exc:  # torn or foreign (parts are written whole, so rare); storage outages go on up
            if isinstance(exc, (storage.StorageUnavailable, storage.StorageAccessError)):
                raise
            break
        if sha256(scene) != record["scene_sha256"]:
            break
        captured = {int(name.split("_", 1)[1]): value for name, value in tensors.items() if name.startswith("latent_")}
        stored.append((StepResult.from_record(record, png_image(scene), tensors[EMBEDDING]), captured))
    return stored
