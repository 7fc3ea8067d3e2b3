"""The held-out boundary and a held-out protocol that mirrors generation (method.md §5).

At generation every candidate of a step carries that step's caption and only
the images differ; the held-out protocol keeps that: for each held-out task and
step, the true step image competes with images of the other held-out tasks,
all under the true caption, scored against the task's earlier steps. Tasks are
split by normalised title, so two tasks of the same dish never sit on both sides.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cosed import storage
from cosed.evaluate import bootstrap_mean
from cosed.selector import ContrastiveSelector, plain_clip_scores

SPLIT = "split.json"
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class TaskScenes:
    """CLIP embeddings (raw encoder outputs) of one task's steps: caption text and step image, (steps, 512) each."""

    task_id: str
    text: np.ndarray
    image: np.ndarray
    title: str = ""


def title_group(title: str, task_id: str) -> str:
    """Tasks with the same lower-cased, punctuation-free title form one group; untitled tasks stand alone."""
    normalised = re.sub(r"[^0-9a-z]+", " ", title.lower()).strip()
    return normalised or f"\x00{task_id}"


def split_by_title(scenes: list[TaskScenes], holdout: float, seed: int) -> tuple[list[TaskScenes], list[TaskScenes]]:
    """A seeded (train, held-out) split of whole title groups; tasks of one step cannot be queried and are dropped.

    Groups are held out in seeded order until ``holdout`` of the tasks are; a
    group that would leave nothing to train on is skipped.
    """
    usable = [s for s in scenes if len(s.text) >= 2]
    groups: dict[str, list[TaskScenes]] = {}
    for scene in usable:
        groups.setdefault(title_group(scene.title, scene.task_id), []).append(scene)
    keys = list(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    target = int(round(holdout * len(usable)))
    held_ids: set[str] = set()
    for index in order:
        if len(held_ids) >= target:
            break
        if len(held_ids) + len(groups[keys[index]]) >= len(usable):
            continue
        held_ids.update(s.task_id for s in groups[keys[index]])
    return [s for s in usable if s.task_id not in held_ids], [s for s in usable if s.task_id in held_ids]


def write_split(folder: str, train: list[TaskScenes], held: list[TaskScenes], holdout: float, seed: int) -> str:
    uri = storage.join(folder, SPLIT)
    storage.write_text(uri, json.dumps({"grouping": "normalised title", "holdout": holdout, "seed": seed,
                                        "train": [s.task_id for s in train],
                                        "held_out": [s.task_id for s in held]}, indent=1) + "\n")
    return uri


def split_beside(checkpoint: str) -> dict | None:
    """The split.json saved next to a selector checkpoint, or None when there is none."""
    folder = checkpoint.rsplit("/", 1)[0] if "/" in checkpoint else "."
    try:
        return json.loads(storage.read_bytes(storage.join(folder, SPLIT)))
    except FileNotFoundError:
        return None


def trained_on(task_ids: list[str], checkpoint: str) -> list[str] | None:
    """Which of these tasks the checkpoint was trained on (its split.json), or None when it has no split.json."""
    split = split_beside(checkpoint)
    if split is None:
        return None
    seen = set(split["train"])
    return [task_id for task_id in task_ids if task_id in seen]


def rank_of_true(scores: np.ndarray, true_index: int = 0) -> tuple[float, float]:
    """(top-1, reciprocal rank) of the true candidate, ties broken at random in expectation."""
    scores = np.asarray(scores)
    greater = int(np.sum(scores > scores[true_index]))
    ties = int(np.sum(scores == scores[true_index])) - 1
    top1 = 1.0 / (ties + 1) if greater == 0 else 0.0
    return top1, 1.0 / (1 + greater + ties / 2)


def generation_retrieval(score: Scorer, held: list[TaskScenes], seed: int = 0) -> dict:
    """Top-1 / MRR (per-task means, bootstrap 95% intervals over tasks) of the true step image.

    For step i >= 2 of a held-out task, the candidates are its true image and
    the step-i image (or last image) of every other held-out task, all with
    the task's own step-i caption, scored against the task's steps before i.
    """
    if len(held) < 2:
        empty = bootstrap_mean([])
        return {"top1": empty, "mrr": empty, "queries": 0, "tasks": len(held)}
    top1_per_task, rr_per_task, queries = [], [], 0
    for own in held:
        others = [s for s in held if s is not own]
        hits, rrs = [], []
        for i in range(1, len(own.text)):
            images = np.stack([own.image[i]] + [s.image[min(i, len(s.image) - 1)] for s in others])
            texts = np.repeat(own.text[i][None], len(images), axis=0)
            hit, rr = rank_of_true(score(texts, images, own.text[:i], own.image[:i]))
            hits.append(hit)
            rrs.append(rr)
        top1_per_task.append(float(np.mean(hits)))
        rr_per_task.append(float(np.mean(rrs)))
        queries += len(hits)
    return {"top1": bootstrap_mean(top1_per_task, seed), "mrr": bootstrap_mean(rr_per_task, seed),
            "queries": queries, "tasks": len(held)}


def selector_scorer(selector: ContrastiveSelector, mode: str = "full") -> Scorer:
    return lambda nt, nv, pt, pv: selector.score(nt, nv, pt, pv, mode)


def compare_selectors(trained: ContrastiveSelector, untrained: ContrastiveSelector, held: list[TaskScenes],
                      seed: int = 0) -> dict[str, dict]:
    """The generation-mirroring protocol for the trained selector, the untrained one and plain CLIP."""
    return {"trained": generation_retrieval(selector_scorer(trained), held, seed),
            "untrained": generation_retrieval(selector_scorer(untrained), held, seed),
            "clip": generation_retrieval(plain_clip_scores, held, seed)}
