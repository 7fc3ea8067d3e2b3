"""CLIP measures that `cosed evaluate` takes from a run's stored files once generation is over.

The writer that joins a task's clips holds no CLIP model, so two measures are made here, after the fact,
through the profile backend's `embed_images` (the call generation itself makes; embeddings do not depend on
what else is in the batch, `cosed.embed.ClipEmbedder`):

- ``boundary_clip``: 100 x (1 - cos) of the CLIP embeddings of the last frame of clip i and the first frame of
  clip i+1, averaged over the video's boundaries (`cosed.continuity`); one embed call per task, two frames per
  boundary.
- ``clip_i_scene_image`` for a run made WITHOUT the tasks' scene images (`EvalRun.baseline_of`): the mean
  100 x cos between each stored scene and the user's image, the image the run with it stored as step 0 (the
  very pixels generation embedded). The run with the image has it in its manifest already.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cosed import storage
from cosed.calls import EmbedImages
from cosed.continuity import boundaries, clip_distance
from cosed.evaluate import read_manifests
from cosed.images import png_image
from cosed.metrics import clip_i_to
from cosed.tasks import task_folder_name

Embed = Callable[[list[np.ndarray]], np.ndarray]


def backend_embed(backend) -> Embed:
    """Images -> raw CLIP features through ``backend.embed_images`` (a `LocalBackend`'s, loaded on first use)."""
    return lambda images: backend.embed_images(EmbedImages(tuple(images)))


def task_bytes(out: str, run: str, manifest: dict, relative: str) -> bytes:
    return storage.read_bytes(storage.join(out, run, task_folder_name(manifest["task_id"]), relative))


def boundary_clip(out: str, run: str, manifest: dict, embed: Embed) -> float | None:
    """The task's boundary continuity in CLIP space from its stored clips; None for a one-clip video."""
    if len(manifest["steps"]) < 2:
        return None
    clips = [task_bytes(out, run, manifest, step["clip"]) for step in manifest["steps"]]
    return clip_distance(boundaries(clips), embed)


def scene_image_closeness(out: str, run: str, manifest: dict, reference: np.ndarray, embed: Embed) -> float:
    """Mean 100 x cos between the task's stored scenes and ``reference`` (the user's image), one embed call."""
    scenes = [png_image(task_bytes(out, run, manifest, step["image"])) for step in manifest["steps"]]
    features = embed(scenes + [reference])
    return clip_i_to(np.asarray(features[:-1]), np.asarray(features[-1]))


class ClipMeasures:
    """``measure(run, manifest) -> {"boundary_clip", ["clip_i_scene_image"]}`` for `evaluate.metric_rows`.

    ``baselines`` maps a run made without scene images to the run made with them: a task of the first is
    measured against the scene image the second stored for the same task id.
    """

    def __init__(self, out: str, embed: Embed, baselines: dict[str, str] | None = None):
        self.out = out
        self.embed = embed
        self.baselines = baselines or {}
        self._with: dict[str, dict[str, dict]] = {}

    def __call__(self, run: str, manifest: dict) -> dict[str, float | None]:
        measured = {"boundary_clip": boundary_clip(self.out, run, manifest, self.embed)}
        if run in self.baselines:
            measured["clip_i_scene_image"] = self.baseline_closeness(run, manifest)
        return measured

    def baseline_closeness(self, run: str, manifest: dict) -> float | None:
        original = self.baselines[run]
        if original not in self._with:
            self._with[original] = {m["task_id"]: m for m in read_manifests(self.out, original)}
        paired = self._with[original].get(manifest["task_id"])
        if paired is None or "scene_image" not in paired:
            return None  # the run with the image did not finish this task: nothing to compare against
        reference = png_image(task_bytes(self.out, original, paired, paired["scene_image"]["image"]))
        return scene_image_closeness(self.out, run, manifest, reference, self.embed)
