"""What model work costs: expected GPU-seconds per call, and per task, for sizing the Ray pools.

Costs are profile data (the ``costs`` section of a profile JSON), overridable with
``ray.costs`` in the config, and refined from call times measured during a run.
The task model follows the engine call for call (`cosed.engine.sequence_task`):
the candidate plan of `cosed.latents.plan_candidates` decides how many images a
step renders, `cosed.generate.batches` how many SD calls they take.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import numpy as np

from cosed.config import PoolConfig, RunConfig
from cosed.generate import batches
from cosed.latents import LatentPool, plan_candidates
from cosed.transitions import clips_ready

KINDS = ("sd", "video", "clip")  # the pools every run has
CAPTION = "caption"  # the pool of the lm rewriter's captioner, when a run uses it
POOLS = KINDS + (CAPTION,)
# Each model call the engine makes, and the pool that serves it.
OPERATIONS = {"render": "sd", "animate": "video", "embed_texts": "clip", "embed_images": "clip",
              "selector_scores": "clip", "caption": CAPTION}
CAPTION_BATCH = 8  # captions per generate call (`cosed.captioner.CaptionerConfig.batch_size`)


@dataclass(frozen=True)
class CallCost:
    """Seconds of one call: a fixed part plus a part per item (image, clip, text)."""

    fixed: float = 0.0
    per_item: float = 0.0

    def seconds(self, items: int) -> float:
        return self.fixed + self.per_item * items


@dataclass(frozen=True)
class CostModel:
    """Expected GPU-seconds per call of each operation, and what each kind asks of a GPU.

    ``whole_gpu[kind]`` is True for models that need a GPU of their own (SD, video);
    the others may take a fractional share of a GPU that another pool uses.
    ``needs_gpu`` says the profile is meant for GPUs: a cluster without any is still starting.
    """

    calls: dict[str, CallCost]
    whole_gpu: dict[str, bool] = field(default_factory=lambda: {"sd": True, "video": True, "clip": False,
                                                                 CAPTION: False})
    needs_gpu: bool = False
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict, overrides: dict | None = None) -> "CostModel":
        """From a profile's ``costs`` section, with ``ray.costs`` (same layout, any subset) on top."""
        merged = copy.deepcopy(data or {})
        for key, value in (overrides or {}).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        unknown = sorted(set(merged) - set(OPERATIONS) - {"whole_gpu", "needs_gpu", "source"})
        if unknown:
            raise ValueError(f"unknown cost key(s): {', '.join(unknown)} (operations: {', '.join(OPERATIONS)})")
        calls = {op: CallCost(**merged.get(op, {})) for op in OPERATIONS}
        whole = {**cls.__dataclass_fields__["whole_gpu"].default_factory(), **merged.get("whole_gpu", {})}
        return cls(calls=calls, whole_gpu=whole, needs_gpu=bool(merged.get("needs_gpu", False)),
                   source=str(merged.get("source", "")))

    def seconds(self, operation: str, items: int = 1) -> float:
        return self.calls[operation].seconds(items)

    def scaled(self, factors: dict[str, float]) -> "CostModel":
        """This model with every operation of each kind in ``factors`` scaled by its factor
        (measured over modeled seconds per call of that pool, see `measured_factors`)."""
        calls = {op: CallCost(c.fixed * factors.get(OPERATIONS[op], 1.0), c.per_item * factors.get(OPERATIONS[op], 1.0))
                 for op, c in self.calls.items()}
        return replace(self, calls=calls)

    def to_dict(self) -> dict:
        return {**{op: {"fixed": c.fixed, "per_item": c.per_item} for op, c in self.calls.items()},
                "whole_gpu": dict(self.whole_gpu), "needs_gpu": self.needs_gpu, "source": self.source}


def candidate_counts(num_steps: int, pool: PoolConfig) -> list[int]:
    """Candidates of each step, from the engine's own candidate plan (counts need no latents)."""
    latents = LatentPool()
    counts = []
    marker = np.zeros(1, dtype=np.float16)
    for step in range(1, num_steps + 1):
        counts.append(len(plan_candidates(step, latents, pool, 0, "count")))
        latents.add_run(step, {k: marker for k in pool.iterations})
    return counts


@dataclass
class TaskWork:
    """Expected model work of one task (or the sum over a batch of tasks)."""

    seconds: dict[str, float]          # kind -> GPU-seconds
    calls: dict[str, int]              # operation -> number of calls
    images: int = 0                    # SD images rendered
    critical_path: float = 0.0         # seconds alone, one actor per pool (sum over tasks for a batch)
    tasks: int = 1

    def __add__(self, other: "TaskWork") -> "TaskWork":
        return TaskWork(seconds={k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0) for k in POOLS},
                        calls={op: self.calls.get(op, 0) + other.calls.get(op, 0) for op in OPERATIONS},
                        images=self.images + other.images, critical_path=self.critical_path + other.critical_path,
                        tasks=self.tasks + other.tasks)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def scaled(self, factor: float) -> "TaskWork":
        """The work of ``factor`` times as many such tasks (counts rounded)."""
        return TaskWork(seconds={k: v * factor for k, v in self.seconds.items()},
                        calls={op: round(n * factor) for op, n in self.calls.items()},
                        images=round(self.images * factor), critical_path=self.critical_path * factor,
                        tasks=max(1, round(self.tasks * factor)))

    def seconds_per_call(self) -> dict[str, float]:
        """Mean modeled seconds of one call, per pool."""
        out = {}
        for kind in POOLS:
            count = sum(n for op, n in self.calls.items() if OPERATIONS[op] == kind)
            if count:
                out[kind] = self.seconds[kind] / count
        return out


def task_work(num_steps: int, cfg: RunConfig, costs: CostModel) -> TaskWork:
    """The calls one task of ``num_steps`` steps makes, their GPU-seconds, and its critical path.

    The critical path is the task alone with one actor per pool: SD, CLIP and the
    selector run step after step; each step's clip starts once its image is chosen
    and clips queue on the single video actor (under keyframe transitions once the next scene is chosen). Under the lm rewriter each step's
    caption is made before (a stage of its own, batched across tasks): its share of
    the generate calls is the task's caption work.
    """
    seconds = dict.fromkeys(POOLS, 0.0)
    calls = dict.fromkeys(OPERATIONS, 0)

    def call(operation: str, items: int) -> float:
        cost = costs.seconds(operation, items)
        seconds[OPERATIONS[operation]] += cost
        calls[operation] += 1
        return cost

    if cfg.rewriter == "lm":
        caption = costs.calls["caption"]
        seconds[CAPTION] += num_steps * (caption.per_item + caption.fixed / CAPTION_BATCH)
        calls["caption"] += math.ceil(num_steps / CAPTION_BATCH)

    clock = 0.0
    if cfg.method == "talc":  # one video-pool call for the whole task: about one clip's work per scene
        video = costs.seconds("animate", 1) * num_steps
        seconds[OPERATIONS["animate"]] += video
        calls["animate"] += 1
        clock += video + call("embed_images", num_steps) + call("embed_texts", num_steps)
        return TaskWork(seconds=seconds, calls=calls, images=0, critical_path=clock)
    video_free = 0.0
    images = 0
    for step, count in enumerate(candidate_counts(num_steps, cfg.pool), start=1):
        if cfg.method == "t2v" or (cfg.method == "mora" and step > 1):
            # t2v: the scene's clip is made from its caption while sequencing (the job then finds it);
            # mora: the scene waits for the previous clip, whose last frame it is
            clock = clock + call("animate", 1) if cfg.method == "t2v" else max(clock, video_free)
            clock += call("embed_images", 1)
            if cfg.method == "mora":
                video_free = max(video_free, clock) + call("animate", 1)
            continue
        images += count
        clock += sum(call("render", len(b)) for b in batches(count, cfg.sd.batch_size))
        if images == count:  # the captions are embedded once the first render is out (`engine.sequence_task`)
            clock += sum(call("embed_texts", num_steps) for _ in range(1 if cfg.selector_text_chars is None else 2))
        clock += call("embed_images", count)
        if step > 1:
            clock += call("selector_scores", count)
        for _ in clips_ready(step, num_steps, cfg.transitions):  # keyframe: a clip waits for the next scene
            video_free = max(video_free, clock) + call("animate", 1)
    clock += call("embed_texts", num_steps)
    return TaskWork(seconds=seconds, calls=calls, images=images, critical_path=max(clock, video_free))


def pool_leads(cfg: RunConfig, costs: CostModel) -> dict[str, float]:
    """Seconds at one end of a run that a pool cannot work, whatever its size: the video pool waits for the
    first scenes (step 1's first batch and its scoring); the SD pool's last scene still needs its clip
    rendered after it. Pools are split so that work per GPU plus lead is even (`sizing.plan_cluster`): it
    changes nothing on a long run and a few GPUs on a short, wide one, where these seconds are a few
    percent of the makespan."""
    if cfg.method in ("t2v", "talc"):  # no text-to-image: the video pool starts on the captions
        return {"video": costs.seconds("embed_texts", 1)}
    first = candidate_counts(1, cfg.pool)[0]
    return {"video": costs.seconds("render", min(first, cfg.sd.batch_size)) + costs.seconds("embed_images", first),
            "sd": costs.seconds("animate", 1)}


def flow_order(tasks: list, cfg: RunConfig, costs: CostModel, capacity: dict[str, float]) -> list:
    """Tasks (anything with ``.steps``) in Johnson's order over the two stages that hold the work.

    A task's first stage is its SD work per SD GPU (``capacity``: GPUs per pool),
    its second its video work per video GPU. Tasks whose first stage is shorter go
    first, by increasing first stage, so the video pool has clips early; the rest go
    last, by decreasing second stage, so the run ends on tasks whose clips finish
    soon after their scenes. For two stages in series this order minimises the
    makespan (Johnson's rule); here it shortens both the start and the tail.
    """
    stages = {}
    for n in {len(t.steps) for t in tasks}:
        seconds = task_work(n, cfg, costs).seconds
        stages[n] = (seconds["sd"] / max(capacity.get("sd", 1.0), 1e-9),
                     seconds["video"] / max(capacity.get("video", 1.0), 1e-9))

    def key(task):
        first, second = stages[len(task.steps)]
        return (0, first) if first < second else (1, -second)

    return sorted(tasks, key=key)


PLAN_SAMPLE = 4096  # pending tasks a run plans from (their step counts, scaled to the estimated total)


def estimated_work(sample: list[int], tasks: int, cfg: RunConfig, costs: CostModel) -> TaskWork:
    """The work of ``tasks`` tasks whose step counts go like ``sample`` (the first pending tasks of a
    streamed input: the run plans from them, never from the whole dataset)."""
    exact = batch_work(sample, cfg, costs)
    return exact if tasks <= len(sample) or not sample else exact.scaled(tasks / len(sample))


def batch_work(step_counts: Iterable[int], cfg: RunConfig, costs: CostModel) -> TaskWork:
    """Summed `task_work` over tasks given by their step counts."""
    per_count: dict[int, TaskWork] = {}
    total = TaskWork(seconds=dict.fromkeys(POOLS, 0.0), calls=dict.fromkeys(OPERATIONS, 0), tasks=0)
    for n in step_counts:
        if n not in per_count:
            per_count[n] = task_work(n, cfg, costs)
        total = total + per_count[n]
    return total


def measured_factors(work: TaskWork, measured: dict[str, tuple[float, int]], min_calls: int = 5) -> dict[str, float]:
    """Per pool, measured over modeled seconds per call; ``measured`` is kind -> (busy seconds, calls).

    Pools with fewer than ``min_calls`` calls keep the model (factor 1).
    """
    factors = {}
    for kind, modeled in work.seconds_per_call().items():
        busy, count = measured.get(kind, (0.0, 0))
        if count >= min_calls and modeled > 0:
            factors[kind] = (busy / count) / modeled
    return factors


def expected_work(tasks, cfg: RunConfig, costs: CostModel) -> dict[str, float]:
    """Expected GPU-seconds of each pool for a batch of tasks (anything with ``.steps``)."""
    return batch_work((len(t.steps) for t in tasks), cfg, costs).seconds


def full_batch_seconds(work: TaskWork, cfg: RunConfig, costs: CostModel) -> float:
    """All modeled GPU work with SD images in full batches: the numerator of the GPU-seconds bound."""
    render = costs.calls["render"]
    sd = work.images * render.per_item + work.images / cfg.sd.batch_size * render.fixed
    return sd + work.seconds["video"] + work.seconds["clip"]


def pool_totals(stats, *fields: str) -> dict[str, tuple[float, ...]]:
    """Per pool (each stat's ``kind``), the sums of ``fields`` over its actors' stats (`ModelWorker.info`)."""
    totals: dict[str, list[float]] = {}
    for item in stats:
        sums = totals.setdefault(item["kind"], [0.0] * len(fields))
        for i, name in enumerate(fields):
            sums[i] += item[name]
    return {kind: tuple(sums) for kind, sums in totals.items()}
