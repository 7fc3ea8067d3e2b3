"""The whole CoSeD sequence for one task, and the files it leaves behind.

`sequence_task` walks the steps in order (captions -> candidates -> CLIP ->
selector -> pool update). Each chosen scene is stored in the task's parts
(`cosed.parts`) and handed on as a `ClipRequest`, the one value every clip call
for that scene sends; the sequence record is stored last. `assemble_task`
builds the task's folder from the parts alone (scenes, clips, video,
storyboard) and writes the manifest last, so a task is done exactly when its
manifest exists. In process and on Ray the same three functions run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cosed import determinism, scene_image, storage
from cosed.backend import Backend
from cosed.calls import ClipRequest, EmbedImages, EmbedTexts, RenderRequest, Score, TalcRequest, TextClipRequest
from cosed.config import RunConfig
from cosed.continuity import boundaries, pixel_distance
from cosed.donemarks import mark_done
from cosed.generate import batches
from cosed.images import png_bytes, png_image
from cosed.lease import LeaseFence
from cosed.latents import CandidateSource, LatentPool, fresh_keys, initial_latents, plan_candidates
from cosed.metrics import clip_i, clip_i_to, clip_t
from cosed.models.profiles import Profile
from cosed.presets import preset_record
from cosed.parts import MANIFEST, TaskParts, task_uri  # noqa: F401  (their callers import them here)
from cosed.steps import StepResult, load_steps, store_scene, store_step
from cosed.seeds import derive_seed
from cosed.selector import clip_pick_scores
from cosed.storyboard import storyboard_png
from cosed.tasks import Task
from cosed.transitions import clips_ready, next_step, overlap_frames, scene_starts
from cosed.video import concat_mp4, count_frames, decode_mp4, dissolve_mp4

USER_SCENE = "scenes/step_00.png"  # the task's own scene image, at the text-to-image size
THUMBNAIL_PX = 256  # candidates kept for inspection (save_candidates) are at most this many pixels a side


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
class SequenceResult:
    task: Task
    steps: list[StepResult]
    metrics: dict[str, float | None]
    timer: Timer = field(default_factory=Timer)
    user: scene_image.UserScene | None = None

    def record(self) -> dict:
        """What the writer needs besides the stored scenes and clips (`assemble_task`)."""
        user = {"scene_image": {"source": self.task.scene_image, "sha256": self.user.sha256}} if self.user else {}
        return {"task_id": self.task.id, "steps": [s.record() for s in self.steps], "metrics": self.metrics,
                "timings": self.timer.to_dict(), **user}


def video_seed(cfg: RunConfig, task_id: str, step: int) -> int:
    """A scene's clip seed: ``video.seed`` when set (the paper preset: one seed for every clip, as the
    reference), else derived from (run seed, task, step)."""
    return cfg.video.seed if cfg.video.seed is not None else derive_seed(cfg.seed, task_id, step, "video")


def selector_texts(captions: list[str], caption_embeddings: np.ndarray, backend: Backend, cfg: RunConfig) -> np.ndarray:
    """The captions' CLIP embeddings as the selector's candidates and past scenes see them: cut to
    ``selector_text_chars`` characters where set (the reference's ``[:77]``), else the caption embeddings."""
    if cfg.selector_text_chars is None:
        return caption_embeddings
    return backend.embed_texts(EmbedTexts(tuple(c[:cfg.selector_text_chars] for c in captions)))


def clip_request(task: Task, step: int, caption: str, cfg: RunConfig, parts: TaskParts,
                 scene_sha256: str, next_sha256: str = "") -> ClipRequest:
    """The one place a clip call is built: a scene's clip follows from the task, the step, the config and the
    scene's content (its sha256 names the scene's and the clip's files); under keyframe transitions also from
    the next scene's content (``next_sha256``), the clip's last frame."""
    following = {"next_scene": parts.scene(step + 1, next_sha256), "next_scene_sha256": next_sha256} \
        if next_sha256 else {}
    return ClipRequest(task_id=task.id, step=step, scene=parts.scene(step, scene_sha256),
                       seed=video_seed(cfg, task.id, step), video=cfg.video, caption=caption,
                       clip=parts.clip(step, scene_sha256, next_sha256), scene_sha256=scene_sha256, **following)


def clip_requests(task: Task, cfg: RunConfig, parts: TaskParts,
                  scenes: list[tuple[int, str, str]]) -> list[ClipRequest]:
    """The clip requests that the chosen ``scenes`` (step, caption, sha256: steps 1..k in order) settle, in
    step order: every scene's under cut and dissolve; under keyframe each one whose next scene is chosen, and
    the last scene's once the task's last step is chosen (`cosed.transitions.clips_ready`)."""
    total, requests = len(task.steps), []
    for step, caption, digest in scenes:
        for ready in clips_ready(step, total, cfg.transitions):
            number, ready_caption, ready_digest = scenes[ready - 1]
            following = next_step(ready, total, cfg.transitions)
            requests.append(clip_request(task, number, ready_caption, cfg, parts, ready_digest,
                                         scenes[following - 1][2] if following else ""))
    return requests


def candidate_path(step: int, index: int) -> str:
    return f"candidates/step_{step:02d}/c{index:02d}.png"


def sequence_task(task: Task, captions: list[str], backend: Backend, cfg: RunConfig, parts: TaskParts | None = None,
                  on_scene: Callable[[ClipRequest], None] | None = None) -> SequenceResult:
    """Choose one image per step (method.md §2-4).

    With ``parts``, each chosen step is stored at once (scene, kept candidates,
    checkpoint: `cosed.steps`) and ``on_scene`` gets its clip request; the
    sequence record is stored last. Steps already stored (a retry, a resume) are
    read back, not chosen again: the run continues at the first step not stored.
    """
    timer = Timer()
    pool = LatentPool()
    steps: list[StepResult] = []
    sent = 0  # clip requests handed to ``on_scene`` so far
    with timer.phase("sd"):
        user = scene_image.user_scene(task, backend, cfg, parts)
    if user is not None:
        pool.add_run(0, user.captured)

    def settled() -> None:
        nonlocal sent
        if on_scene is None:
            return
        requests = clip_requests(task, cfg, parts, [(s.number, s.caption, s.scene_sha256) for s in steps])
        for request in requests[sent:]:
            on_scene(request)
        sent = len(requests)

    for step, captured in load_steps(parts, len(task.steps)) if parts is not None else []:
        pool.add_run(step.number, captured)
        steps.append(step)
        settled()
    shape = backend.latent_shape(cfg.sd)
    keep = THUMBNAIL_PX if cfg.save_candidates else 0
    caption_embeddings = cut_embeddings = None  # embedded once step 1's render is out (`texts`)

    def texts() -> tuple[np.ndarray, np.ndarray]:
        """The captions' CLIP embeddings, made when first needed: after step 1's render, so that a run's
        first SD calls never wait behind every task's text embedding on the CLIP pool."""
        nonlocal caption_embeddings, cut_embeddings
        if caption_embeddings is None:
            caption_embeddings = backend.embed_texts(EmbedTexts(tuple(captions)))
            cut_embeddings = selector_texts(captions, caption_embeddings, backend, cfg)
        return caption_embeddings, cut_embeddings

    for number, (text, caption) in enumerate(zip(task.steps, captions), start=1):
        if number <= len(steps):
            continue
        if cfg.method == "talc":
            with timer.phase("video"):
                made = talc_steps(task, captions, backend, cfg, parts)
            for step in made[number - 1:]:
                steps.append(step)
                store_step(parts, step, {})
                settled()
            break
        if cfg.method == "t2v":
            with timer.phase("video"):
                step = text_clip_step(task, number, text, caption, backend, cfg, parts)
            steps.append(step)
            store_step(parts, step, {})
            settled()
            continue
        if cfg.method == "mora" and number > 1:
            with timer.phase("video"):
                step = last_frame_step(task, number, text, caption, steps[-1], backend, cfg, parts)
            steps.append(step)
            store_step(parts, step, {})
            settled()
            continue
        sources = plan_candidates(number, pool, cfg.pool, cfg.seed, task.id)
        keys = fresh_keys(number, cfg.pool, cfg.seed, task.id)
        starts = initial_latents(sources + keys, pool, shape)
        requests = [RenderRequest(caption, starts[list(rows)], cfg.sd, tuple(cfg.pool.iterations), keep)
                    for rows in batches(len(starts), cfg.sd.batch_size)]
        with timer.phase("sd"):
            rendered = backend.render(requests)
        handles = [handle for batch in rendered for handle in batch.images]
        with timer.phase("clip_select"):
            caption_embeddings, cut_embeddings = texts()
            embeddings = backend.embed_images(EmbedImages(tuple(handles)))
            image_embeddings, key_embeddings = embeddings[:len(sources)], embeddings[len(sources):]
            if number == 1 and user is None:
                scores = clip_pick_scores(image_embeddings, caption_embeddings[0])
            else:  # the user's scene (paired with this step's caption, as a key is) is a past scene too
                # Fresh keys carry the whole current caption (the reference embeds it before cutting it).
                now = caption_embeddings[number - 1][None]
                past_text = np.concatenate(([now] if user else []) + [
                    cut_embeddings[:number - 1], np.repeat(now, len(keys), axis=0)])
                past_image = np.concatenate(([user.embedding[None]] if user else []) + [
                    np.asarray([s.image_embedding for s in steps]).reshape(-1, image_embeddings.shape[1]),
                    key_embeddings])
                scores = backend.selector_scores(Score(
                    np.repeat(cut_embeddings[number - 1][None], len(sources), axis=0), image_embeddings,
                    past_text, past_image))
        chosen = int(np.argmax(scores))
        batch_index, row = divmod(chosen, cfg.sd.batch_size)
        captured = {k: v[row] for k, v in rendered[batch_index].captured.items()}
        pool.add_run(number, captured)
        image = backend.fetch(handles[chosen])
        kept, digest = None, ""
        if parts is not None:
            digest = store_scene(parts, number, png_bytes(image))
            if keep:
                thumbnails = [t for batch in rendered for t in batch.thumbnails][:len(sources)]
                for index, data in enumerate(thumbnails):
                    storage.write_bytes(parts.candidate(number, index), data)
                kept = [candidate_path(number, index) for index in range(len(thumbnails))]
        step = StepResult(number=number, text=text, caption=caption, sources=sources,
                          scores=[float(s) for s in scores], chosen=chosen, image=image,
                          image_embedding=image_embeddings[chosen],
                          video_seed=video_seed(cfg, task.id, number), fresh_keys=keys,
                          candidate_images=kept, scene_sha256=digest)
        steps.append(step)
        if parts is not None:
            store_step(parts, step, captured)
            settled()
    with timer.phase("clip_select"):
        chosen_images = np.stack([s.image_embedding for s in steps])
        metrics = {"clip_i": clip_i(chosen_images),
                   "clip_t": clip_t(chosen_images, backend.embed_texts(EmbedTexts(tuple(task.steps))))}
        if user is not None:
            metrics["clip_i_scene_image"] = clip_i_to(chosen_images, user.embedding)
    result = SequenceResult(task=task, steps=steps, metrics=metrics, timer=timer, user=user)
    if parts is not None:
        storage.write_text(parts.sequence, json.dumps(result.record(), ensure_ascii=False) + "\n")
    return result


def last_frame_step(task: Task, number: int, text: str, caption: str, previous: StepResult, backend: Backend,
                    cfg: RunConfig, parts: TaskParts | None) -> StepResult:
    """Mora (the paper's description): scene ``number`` is the last frame of the previous scene's clip, which
    this waits for (`Backend.animate`: rendered here in process; on Ray the job renders it, the driver waits)."""
    if parts is None:
        raise ValueError("the mora method needs the task's parts: it reads the previous clip")
    request = clip_request(task, number - 1, previous.caption, cfg, parts, previous.scene_sha256)
    backend.animate(request)
    image = np.ascontiguousarray(decode_mp4(storage.read_bytes(request.clip))[-1])
    embedding = backend.embed_images(EmbedImages((image,)))[0]
    digest = store_scene(parts, number, png_bytes(image))
    return StepResult(number=number, text=text, caption=caption, sources=[CandidateSource.last_frame(number - 1)],
                      scores=[1.0], chosen=0, image=image, image_embedding=embedding,
                      video_seed=video_seed(cfg, task.id, number), scene_sha256=digest)


def text_clip_step(task: Task, number: int, text: str, caption: str, backend: Backend, cfg: RunConfig,
                   parts: TaskParts | None) -> StepResult:
    """The t2v method ("Lumiere alone" of the paper, on the profile's text-to-video model): the caption straight
    to the video model; the clip's first frame is the scene, and the clip is stored as that scene's clip."""
    if parts is None:
        raise ValueError("the t2v method needs the task's parts: it stores the clip it makes")
    request = TextClipRequest(task_id=task.id, step=number, caption=caption, seed=video_seed(cfg, task.id, number),
                              video=cfg.video, clip=parts.text_clip(number))
    backend.text_to_video(request)
    data = storage.read_bytes(request.clip)
    image = np.ascontiguousarray(decode_mp4(data)[0])
    embedding = backend.embed_images(EmbedImages((image,)))[0]
    digest = store_scene(parts, number, png_bytes(image))
    if not storage.exists(parts.clip(number, digest)):
        storage.write_bytes(parts.clip(number, digest), data)
    return StepResult(number=number, text=text, caption=caption, sources=[CandidateSource(kind="text")],
                      scores=[1.0], chosen=0, image=image, image_embedding=embedding,
                      video_seed=request.seed, scene_sha256=digest)


def talc_steps(task: Task, captions: list[str], backend: Backend, cfg: RunConfig,
               parts: TaskParts | None) -> list[StepResult]:
    """The talc method (TALC on LTX-Video, `cosed.talc`): one generation for the whole task; each scene is the
    first frame of its part, whose clip is stored as that scene's clip."""
    if parts is None:
        raise ValueError("the talc method needs the task's parts: it stores the clips it makes")
    numbers = range(1, len(task.steps) + 1)
    request = TalcRequest(task_id=task.id, captions=tuple(captions), seed=video_seed(cfg, task.id, 1),
                          video=cfg.video, scenes=tuple(parts.talc_scene(n) for n in numbers),
                          clips=tuple(parts.talc_clip(n) for n in numbers))
    backend.talc_video(request)
    images = [png_image(storage.read_bytes(uri)) for uri in request.scenes]
    embeddings = backend.embed_images(EmbedImages(tuple(images)))
    steps = []
    for number, text, caption, image, embedding in zip(numbers, task.steps, captions, images, embeddings):
        digest = store_scene(parts, number, png_bytes(image))
        if not storage.exists(parts.clip(number, digest)):
            storage.write_bytes(parts.clip(number, digest), storage.read_bytes(request.clips[number - 1]))
        steps.append(StepResult(number=number, text=text, caption=caption, sources=[CandidateSource(kind="talc")],
                                scores=[1.0], chosen=0, image=image, image_embedding=embedding,
                                video_seed=request.seed, scene_sha256=digest))
    return steps


def stored_sequence(task: Task, cfg: RunConfig, parts: TaskParts) -> list[ClipRequest] | None:
    """The clip requests of a task whose sequence record is already stored (a retry or a resume), else None."""
    try:
        record = json.loads(storage.read_bytes(parts.sequence))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign record: sequence again (parts are written whole, so rare)
        return None
    return clip_requests(task, cfg, parts, [(step["step"], step["caption"], step["scene_sha256"])
                                            for step in record["steps"]])


def source_label(source: dict) -> str:
    if source["kind"] == "text":
        return "text only"
    if source["kind"] == "talc":
        return "TALC part"
    if source["kind"] == "clip":
        return f"clip {source['step']} last frame"
    return "fresh" if source["kind"] == "fresh" else f"step {source['step']} it {source['iteration']}"


def manifest_config(cfg: RunConfig) -> dict:
    """The settings that decide the outputs (machine-specific ones left out)."""
    data = cfg.to_dict()
    for machine_specific in ("device", "cache_dir", "ray", "storage"):
        data.pop(machine_specific)
    if not data["memory_plan"]:
        data.pop("memory_plan")  # every pool plain: nothing that depends on the GPUs
    if data["transitions"] != "dissolve":
        data.pop("transition_frames")  # used by dissolves only
    if data["transitions"] == "cut":
        data.pop("transitions")  # the default: the fingerprints of runs before transitions stay as they were
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


UNTRAINED_SELECTOR = ("untrained: no --selector given, so the selector's maps are shared random orthonormal "
                      "projections and its picks are close to plain CLIP similarity, not the paper's trained selector")


def selector_weights(cfg: RunConfig) -> str:
    """What chose the scenes, in words for the manifest and the report: the checkpoint, or plainly untrained."""
    return f"trained: {cfg.selector}" if cfg.selector else UNTRAINED_SELECTOR


def task_fingerprint(task: Task, profile: Profile, cfg: RunConfig) -> str:
    """What decides a task's outputs: its content, the decisive config, the models, the selector weights and,
    under the lm rewriter, the captioner's weights.

    The user's scene image (if any) counts by its bytes' sha256. Resume skips a task only when its manifest
    carries this same fingerprint.
    """
    described = dataclasses.asdict(task)
    described.pop("scene_image")  # its content counts, not its name: the fingerprints without one stay as they were
    payload = {"task": described, "config": manifest_config(cfg), "models": profile.model_names(),
               "selector": selector_checksum(cfg.selector), "preset": preset_record(cfg)}
    if task.scene_image:
        payload["scene_image"] = scene_image.sha256(task)
    if cfg.rewriter == "lm":
        payload["captioner"] = captioner_checksum(cfg)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def assemble_task(out: str, task: Task, fingerprint: str, profile: Profile, cfg: RunConfig,
                  fence: LeaseFence | None = None, extra_timings: dict[str, float] | None = None) -> dict:
    """The task's folder from its parts: scenes, clips, video, storyboard, then the manifest (last).

    ``fence`` (the run's output lease) raises `LeaseLost` when this job may no longer
    write; every file goes through it (`LeaseFence.write`: checked, then bounded in time).
    Holds the task's encoded clips twice (clips + joined video) and its scene PNGs:
    never raw frames. Removes the parts once the manifest is written.
    """
    storage.configure(cfg.storage.retry_seconds, cfg.storage.throttle_seconds)
    previous = _stored_manifest(out, task)
    parts = TaskParts.of(out, task.folder, fingerprint)
    put = fence.write if fence is not None else storage.write_bytes
    timer = Timer()
    with timer.phase("stitch"):
        try:  # every part is read before any file of the task is touched
            record, files = _read_parts(parts, task, cfg)
        except FileNotFoundError:
            if previous is not None and previous.get("fingerprint") == fingerprint:
                return previous  # a re-run of a writer that wrote the manifest and removed parts since
            raise
        if previous is not None:  # a redo: no manifest may ever name a mix of old and new files
            if fence is not None:
                fence()
            storage.delete(task_uri(out, task, MANIFEST))
        for relative, _, data in files:
            put(task_uri(out, task, relative), data)
        written = [uri for _, uri, _ in files] + [uri for step in record["steps"] for uri in (
            parts.step_tensors(step["step"]), parts.step_record(step["step"]))]
        steps_meta, clips, scenes = [], [], []
        for step in record["steps"]:
            number, digest = step["step"], step["scene_sha256"]
            image_rel, clip_rel = f"scenes/step_{number:02d}.png", f"clips/step_{number:02d}.mp4"
            scene, clip = _part_bytes(files, image_rel), _part_bytes(files, clip_rel)
            scenes.append(scene)
            clips.append(clip)
            meta = {k: v for k, v in step.items() if k != "video_seed"}
            steps_meta.append({**meta, "image": image_rel, "clip": clip_rel, "frames": count_frames(clip)})
        metrics = {**record["metrics"], "boundary_mad": pixel_distance(boundaries(clips))}  # `cosed.continuity`
        overlap = overlap_frames(cfg)
        if cfg.transitions != "cut":  # where each scene begins in the video (a dissolve shares its frames)
            for meta, start in zip(steps_meta, scene_starts([m["frames"] for m in steps_meta], overlap)):
                meta["start_frame"] = start
        tags = {"title": task.title or "", "comment": f"cosed task {task.id}"}
        video = dissolve_mp4(clips, overlap, cfg.video.fps, tags) if overlap else concat_mp4(clips, metadata=tags)
        put(task_uri(out, task, "video.mp4"), video)
        user = record.get("scene_image")
        if user is not None:  # the user's scene is step 0 of the storyboard, never a scene of the video
            user = {**user, "image": USER_SCENE}
        board = ([png_image(_part_bytes(files, USER_SCENE))] if user else []) + [png_image(scene) for scene in scenes]
        title = (task.title or task.id) + ("" if cfg.transitions == "cut" else f"  ({cfg.transitions} transitions)")
        put(task_uri(out, task, "storyboard.png"), storyboard_png(
            title, board, (["your scene image"] if user else []) + [s["caption"] for s in record["steps"]],
            (["scene_image"] if user else []) + [source_label(s["candidates"][s["chosen"]]["source"])
                                                 for s in record["steps"]], first_step=0 if user else 1))
    manifest = {
        "task_id": task.id, "fingerprint": fingerprint, "title": task.title,
        "seed": cfg.seed, "profile": profile.name,
        "random_weights": profile.random_weights, "models": profile.model_names(),
        **({"captioner": captioner_checksum(cfg)} if cfg.rewriter == "lm" else {}),
        "config": manifest_config(cfg), "preset": preset_record(cfg),
        "selector_weights": selector_weights(cfg), "determinism": determinism.record(cfg.cpu_threads),
        **({"scene_image": user} if user else {}), "steps": steps_meta, "metrics": metrics,
        "video": "video.mp4", "video_frames": video_frames(steps_meta, overlap), "fps": cfg.video.fps,
        "storyboard": "storyboard.png",
        "timings": {**record.get("timings", {}), **timer.to_dict(), **(extra_timings or {})},
    }
    put(task_uri(out, task, MANIFEST), (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    mark_done(out, task.folder, fingerprint, put)
    if previous is not None:
        _remove_unlisted(out, task, manifest)
    for uri in written + [parts.sequence]:
        try:
            storage.delete(uri)
        except Exception:  # parts left behind are harmless: a later run of these inputs reuses them
            pass
    return manifest


def _read_parts(parts: TaskParts, task: Task, cfg: RunConfig) -> tuple[dict, list[tuple[str, str, bytes]]]:
    """The sequence record and every file the task's folder gets from its parts: (path in the task folder,
    part URI, bytes). Raises FileNotFoundError when a part is missing."""
    record = json.loads(storage.read_bytes(parts.sequence))
    user = record.get("scene_image")
    files = [(USER_SCENE, parts.scene(0, user["sha256"]))] if user else []
    clips = {request.step: request.clip for request in clip_requests(
        task, cfg, parts, [(step["step"], step["caption"], step["scene_sha256"]) for step in record["steps"]])}
    for step in record["steps"]:
        number = step["step"]
        files.append((f"scenes/step_{number:02d}.png", parts.scene(number, step["scene_sha256"])))
        files.append((f"clips/step_{number:02d}.mp4", clips[number]))
        files += [(entry["image"], parts.candidate(number, index))
                  for index, entry in enumerate(step["candidates"]) if "image" in entry]
    return record, [(relative, uri, storage.read_bytes(uri)) for relative, uri in files]


def video_frames(steps_meta: list[dict], overlap: int) -> int:
    """Frames of the joined video: the clips' frames less one overlap per boundary (dissolve)."""
    frames = [s["frames"] for s in steps_meta]
    return (scene_starts(frames, overlap)[-1] + frames[-1]) if frames else 0


def _part_bytes(files: list[tuple[str, str, bytes]], relative: str) -> bytes:
    return next(data for path, _, data in files if path == relative)


def _remove_unlisted(out: str, task: Task, manifest: dict) -> None:
    """Files of the task's previous outputs that the new manifest does not name (it had more steps or kept
    candidates): removed once the new manifest is written."""
    keep = {MANIFEST, manifest["video"], manifest["storyboard"], *([USER_SCENE] if "scene_image" in manifest else [])}
    for step in manifest["steps"]:
        keep |= {step["image"], step["clip"], *(c["image"] for c in step["candidates"] if "image" in c)}
    root = task_uri(out, task)
    for uri in storage.list_keys(root):
        if uri[len(root) + 1:] not in keep:
            storage.delete(uri)


def _stored_manifest(out: str, task: Task) -> dict | None:
    """The task's manifest as stored (``{}`` when unreadable), None where there is none. Its old files stay
    until the new ones are complete: the writer replaces them (a redo) or returns it (the same fingerprint)."""
    try:
        manifest = json.loads(storage.read_bytes(task_uri(out, task, MANIFEST)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def generate_task(task: Task, captions: list[str], backend: Backend, profile: Profile, cfg: RunConfig,
                  out: str, fingerprint: str, on_step: Callable[[int], None] | None = None,
                  fence: LeaseFence | None = None) -> dict:
    """The whole task in this process: sequence (storing scenes), animate each scene, assemble."""
    start = time.perf_counter()
    parts = TaskParts.of(out, task.folder, fingerprint)
    requests = stored_sequence(task, cfg, parts)
    if requests is None:
        requests = []

        def scene(request: ClipRequest) -> None:
            requests.append(request)
            if on_step:
                on_step(request.step)

        sequence_task(task, captions, backend, cfg, parts, on_scene=scene)
    elif on_step:
        for request in requests:
            on_step(request.step)
    video_start = time.perf_counter()
    for request in requests:
        backend.animate(request)
    return assemble_task(out, task, fingerprint, profile, cfg, fence, extra_timings={
        "video": round(time.perf_counter() - video_start, 4), "total": round(time.perf_counter() - start, 4)})


def manifest_without_timings(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "timings"}
