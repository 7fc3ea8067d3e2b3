"""A task's parts: what sequencing and clip calls store before the writer assembles the task.

No result lives only in a process: the driver stores each chosen scene (and the
candidates' thumbnails, when kept) as it goes and the sequence record when it is
done; each clip call stores its clip. All of it sits under the task's fingerprint,

    OUT/.cosed-parts/<task folder>/<fingerprint>/
        scene_NN_<hash>.png, clip_NN_<hash>[_<next hash>].mp4   (named by the scenes' content: written once)
        step_NN.safetensors, step_NN.json         (a chosen step's checkpoint, `cosed.steps`)
        cand_NN_KK.png, sequence.json

so a retry or a resume with the same inputs and config continues from the last
stored step, and parts of other inputs or config are never read. A scene and its
clip are named by the scene's sha256: a re-render that gave other pixels (another
GPU type) writes other files, so a clip only ever animates the scene beside it.
The writer copies the parts to the task's folder, writes the manifest last and
removes the parts; what a stopped job left of that removal is removed by the next
run, which finds the task done.
"""

from __future__ import annotations

from dataclasses import dataclass

from cosed import storage

PARTS = ".cosed-parts"
MANIFEST = "manifest.json"  # a task is done exactly when this is written, last, in its folder


def task_uri(out: str, task, *parts: str) -> str:
    """A file of ``task``'s output folder."""
    return storage.join(out, task.folder, *parts)


HASH_CHARS = 16  # of the scene's sha256 in scene and clip names


@dataclass(frozen=True)
class TaskParts:
    root: str

    @classmethod
    def of(cls, out: str, folder: str, fingerprint: str) -> "TaskParts":
        return cls(storage.join(out, PARTS, folder, fingerprint))

    def scene(self, step: int, sha256: str) -> str:
        return storage.join(self.root, f"scene_{step:02d}_{sha256[:HASH_CHARS]}.png")

    def clip(self, step: int, scene_sha256: str, next_sha256: str = "") -> str:
        """A keyframe clip (it ends on the next scene) is named by both scenes' content."""
        ending = f"_{next_sha256[:HASH_CHARS]}" if next_sha256 else ""
        return storage.join(self.root, f"clip_{step:02d}_{scene_sha256[:HASH_CHARS]}{ending}.mp4")

    def text_clip(self, step: int) -> str:
        """The t2v method's clip of a step, before its first frame names the scene."""
        return storage.join(self.root, f"t2v_{step:02d}.mp4")

    def talc_scene(self, step: int) -> str:
        """The talc method's scene (first frame of its part of the one generation), before it is named."""
        return storage.join(self.root, f"talc_{step:02d}.png")

    def talc_clip(self, step: int) -> str:
        return storage.join(self.root, f"talc_{step:02d}.mp4")

    def step_tensors(self, step: int) -> str:
        return storage.join(self.root, f"step_{step:02d}.safetensors")

    def step_record(self, step: int) -> str:
        return storage.join(self.root, f"step_{step:02d}.json")

    def candidate(self, step: int, index: int) -> str:
        return storage.join(self.root, f"cand_{step:02d}_{index:02d}.png")

    @property
    def sequence(self) -> str:
        return storage.join(self.root, "sequence.json")


def stale_parts(out: str, folder: str, fingerprint: str) -> list[str]:
    """Parts a task left under other fingerprints (its inputs or config changed): safe to remove."""
    keep = TaskParts.of(out, folder, fingerprint).root
    return [uri for uri in storage.list_keys(storage.join(out, PARTS, folder)) if not uri.startswith(keep + "/")]


def leftover_parts(out: str, done_folders: set[str]) -> list[str]:
    """Parts of tasks whose manifest is written (a job stopped while removing them): one listing of the
    parts folder, which holds only the parts of tasks in flight or interrupted."""
    root = storage.join(out, PARTS)
    return [uri for uri in storage.list_keys(root) if uri[len(root) + 1:].split("/", 1)[0] in done_folders]
