"""The whole CoSeD sequence for one task, and the files it leaves behind.

`sequence_task` walks the steps in order (captions -> candidates -> CLIP ->
selector -> pool update); each chosen scene is animated and encoded to an
H.264 clip at once; `write_task_outputs` joins the encoded clips (no re-decode)
and writes the output contract with the manifest last, so a task is done
exactly when its manifest exists. The Ray writers call the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from cosed import storage
from cosed.backend import Backend
from cosed.config import RunConfig
from cosed.generate import batches
from cosed.latents import CandidateSource, LatentPool, fresh_keys, initial_latents, plan_candidates
from cosed.metrics import clip_i, clip_t
from cosed.models.profiles import Profile
from cosed.seeds import derive_seed
from cosed.selector import clip_pick_scores
from cosed.storyboard import storyboard_png
from cosed.tasks import Task
from cosed.video import EncodedClip, concat_mp4, encode_clip

MANIFEST = "manifest.json"


class Timer:
    """Wall-clock seconds per phase; kept out of everything that must be reproducible."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


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
    candidate_images: np.ndarray | None = None
    fresh_keys: list[CandidateSource] = field(default_factory=list)


@dataclass
class SequenceResult:
    task: Task
    steps: list[StepResult]
    metrics: dict[str, float | None]
    timer: Timer = field(default_factory=Timer)


def sequence_task(task: Task, captions: list[str], backend: Backend, cfg: RunConfig,
                  on_scene: Callable[[StepResult], None] | None = None,
                  on_step: Callable[[int], None] | None = None) -> SequenceResult:
    """Choose one image per step (method.md §2-4). ``on_scene`` sees each chosen scene at once."""
    timer = Timer()
    pool = LatentPool()
    shape = backend.latent_shape(cfg.sd)
    with timer.phase("clip_select"):
        caption_embeddings = backend.embed_texts(captions)
    steps: list[StepResult] = []
    for number, (text, caption) in enumerate(zip(task.steps, captions), start=1):
        sources = plan_candidates(number, pool, cfg.pool, cfg.seed, task.id)
        keys = fresh_keys(number, cfg.pool, cfg.seed, task.id)
        starts = initial_latents(sources + keys, pool, shape)
        with timer.phase("sd"):
            rendered = backend.render_many(caption, [starts[list(b)] for b in batches(len(starts), cfg.sd.batch_size)],
                                           cfg.sd, cfg.pool.iterations)
        rendered_images = np.concatenate([r.images for r in rendered])
        images = rendered_images[:len(sources)]
        with timer.phase("clip_select"):
            rendered_embeddings = backend.embed_images(rendered_images)
            image_embeddings, key_embeddings = rendered_embeddings[:len(sources)], rendered_embeddings[len(sources):]
            if number == 1:
                scores = clip_pick_scores(image_embeddings, caption_embeddings[0])
            else:
                past_text = np.concatenate([caption_embeddings[:number - 1],
                                            np.repeat(caption_embeddings[number - 1][None], len(keys), axis=0)])
                past_image = np.concatenate([np.stack([s.image_embedding for s in steps]), key_embeddings])
                scores = backend.selector_scores(
                    np.repeat(caption_embeddings[number - 1][None], len(images), axis=0), image_embeddings,
                    past_text, past_image)
        chosen = int(np.argmax(scores))
        batch_index, row = divmod(chosen, cfg.sd.batch_size)
        pool.add_run(number, {k: v[row] for k, v in rendered[batch_index].captured.items()})
        step = StepResult(number=number, text=text, caption=caption, sources=sources,
                          scores=[float(s) for s in scores], chosen=chosen, image=images[chosen],
                          image_embedding=image_embeddings[chosen],
                          video_seed=derive_seed(cfg.seed, task.id, number, "video"),
                          candidate_images=images if cfg.save_candidates else None, fresh_keys=keys)
        steps.append(step)
        if on_scene:
            on_scene(step)
        if on_step:
            on_step(number)
    with timer.phase("clip_select"):
        chosen_images = np.stack([s.image_embedding for s in steps])
        metrics = {"clip_i": clip_i(chosen_images), "clip_t": clip_t(chosen_images, backend.embed_texts(list(task.steps)))}
    return SequenceResult(task=task, steps=steps, metrics=metrics, timer=timer)


def source_label(source: CandidateSource) -> str:
    return "fresh" if source.kind == "fresh" else f"step {source.step} it {source.iteration}"


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Candidate images are kept for inspection only: at most ``size`` pixels a side."""
    if max(image.shape[:2]) <= size:
        return image
    picture = Image.fromarray(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def manifest_config(cfg: RunConfig) -> dict:
    """The settings that decide the outputs (machine-specific ones left out)."""
    data = cfg.to_dict()
    for machine_specific in ("device", "cache_dir", "ray", "storage"):
        data.pop(machine_specific)
    return data


@functools.lru_cache(maxsize=8)
def selector_checksum(uri: str | None) -> str | None:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest() if uri else None


@functools.lru_cache(maxsize=8)
def _captioner_checksum(source: str, cache_dir: str | None) -> str:
    from cosed.captioner import weights_checksum

    return weights_checksum(source, cache_dir)


def captioner_checksum(cfg: RunConfig) -> str | None:
    """The lm rewriter's captioner weights; None under any other rewriter, where no model decides the captions."""
    return _captioner_checksum(cfg.rewriter_model, cfg.cache_dir) if cfg.rewriter == "lm" and cfg.rewriter_model else None


def task_fingerprint(task: Task, profile: Profile, cfg: RunConfig) -> str:
    """What decides a task's outputs: its content, the decisive config, the models, the selector weights and,
    under the lm rewriter, the captioner's weights.

    Resume skips a task only when its manifest carries this same fingerprint.
    """
    payload = {"task": dataclasses.asdict(task), "config": manifest_config(cfg), "models": profile.model_names(),
               "selector": selector_checksum(cfg.selector)}
    if cfg.rewriter == "lm":
        payload["captioner"] = captioner_checksum(cfg)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def task_uri(out: str, task: Task, *parts: str) -> str:
    return storage.join(out, task.folder, *parts)


def write_task_outputs(out: str, result: SequenceResult, clips: list[EncodedClip], profile: Profile,
                       cfg: RunConfig, extra_timings: dict[str, float] | None = None) -> dict:
    """Write scenes, clips, video, storyboard, then the manifest (last).

    Holds at most the task's encoded clips twice (clips + joined video) and its
    chosen images: never raw frames.
    """
    storage.configure(cfg.storage.retry_seconds)
    task = result.task
    timer = result.timer
    steps_meta = []
    with timer.phase("stitch"):
        for step, clip in zip(result.steps, clips):
            image_rel, clip_rel = f"scenes/step_{step.number:02d}.png", f"clips/step_{step.number:02d}.mp4"
            storage.write_bytes(task_uri(out, task, image_rel), png_bytes(step.image))
            storage.write_bytes(task_uri(out, task, clip_rel), clip.data)
            candidates = [{"source": s.to_dict(), "score": score} for s, score in zip(step.sources, step.scores)]
            if step.candidate_images is not None:
                for index, (entry, image) in enumerate(zip(candidates, step.candidate_images)):
                    entry["image"] = f"candidates/step_{step.number:02d}/c{index:02d}.png"
                    storage.write_bytes(task_uri(out, task, entry["image"]), png_bytes(thumbnail(image)))
            steps_meta.append({
                "step": step.number, "text": step.text, "caption": step.caption,
                "candidates": candidates,
                "chosen": step.chosen, "image": image_rel, "clip": clip_rel,
                "frames": clip.frames,
                **({"fresh_keys": [s.to_dict() for s in step.fresh_keys]} if step.fresh_keys else {}),
            })
        video = concat_mp4([clip.data for clip in clips],
                           metadata={"title": task.title or "", "comment": f"cosed task {task.id}"})
        storage.write_bytes(task_uri(out, task, "video.mp4"), video)
        storage.write_bytes(task_uri(out, task, "storyboard.png"), storyboard_png(
            task.title or task.id, [s.image for s in result.steps], [s.caption for s in result.steps],
            [source_label(s.sources[s.chosen]) for s in result.steps]))
    manifest = {
        "task_id": task.id, "fingerprint": task_fingerprint(task, profile, cfg), "title": task.title,
        "seed": cfg.seed, "profile": profile.name,
        "random_weights": profile.random_weights, "models": profile.model_names(),
        **({"captioner": captioner_checksum(cfg)} if cfg.rewriter == "lm" else {}),
        "config": manifest_config(cfg), "steps": steps_meta, "metrics": result.metrics,
        "video": "video.mp4", "video_frames": sum(clip.frames for clip in clips), "fps": cfg.video.fps, "storyboard": "storyboard.png",
        "timings": {**timer.to_dict(), **(extra_timings or {})},
    }
    storage.write_text(task_uri(out, task, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def generate_task(task: Task, captions: list[str], backend: Backend, profile: Profile, cfg: RunConfig,
                  out: str, on_step: Callable[[int], None] | None = None) -> dict:
    """The whole task in this process: sequence, animate and encode each scene, join, write."""
    start = time.perf_counter()
    result = sequence_task(task, captions, backend, cfg, on_step=on_step)
    clips = []
    with result.timer.phase("video"):
        for step in result.steps:
            clips.append(encode_clip(backend.animate(step.image, step.video_seed, cfg.video, step.caption),
                                     cfg.video.fps))
    return write_task_outputs(out, result, clips, profile, cfg,
                              extra_timings={"total": round(time.perf_counter() - start, 4)})


def manifest_without_timings(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "timings"}
