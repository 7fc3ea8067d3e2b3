"""The latent pool (method.md §2): early denoising latents of each step's chosen run.

Candidates for step i start from latents of *any* earlier step, not only i-1;
that non-linear reach is what lets a later step return to an earlier scene.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from cosed.config import PoolConfig
from cosed.seeds import derive_seed, gaussian_latent, generator


@dataclass(frozen=True)
class CandidateSource:
    """Where a candidate's initial latent came from: a fresh seed or (step, iteration) of the pool."""

    kind: str
    step: int | None = None
    iteration: int | None = None
    seed: int | None = None

    @classmethod
    def fresh(cls, seed: int) -> "CandidateSource":
        return cls(kind="fresh", seed=seed)

    @classmethod
    def pooled(cls, step: int, iteration: int) -> "CandidateSource":
        return cls(kind="pool", step=step, iteration=iteration)

    @classmethod
    def last_frame(cls, step: int) -> "CandidateSource":
        """The last frame of ``step``'s clip (the mora method)."""
        return cls(kind="clip", step=step)

    def to_dict(self) -> dict:
        return asdict(self)


class LatentPool:
    """Latents z_{T-k} of the chosen run of every finished step, float16 on the CPU."""

    def __init__(self) -> None:
        self._latents: dict[tuple[int, int], np.ndarray] = {}

    def add_run(self, step: int, captured: dict[int, np.ndarray]) -> None:
        for iteration, latent in captured.items():
            self._latents[(step, iteration)] = np.ascontiguousarray(latent, dtype=np.float16)

    def keys(self) -> list[tuple[int, int]]:
        return sorted(self._latents)

    def __len__(self) -> int:
        return len(self._latents)

    def has_step(self, step: int) -> bool:
        return any(j == step for j, _ in self._latents)

    def latent(self, step: int, iteration: int) -> np.ndarray:
        return self._latents[(step, iteration)]


def plan_candidates(step: int, pool: LatentPool, cfg: PoolConfig, run_seed: int, task_id: str) -> list[CandidateSource]:
    """The candidate sources of one step, in a fixed order: pool (by step, iteration), then fresh.

    Step 0 is the user's scene image (`cosed.scene_image`): with it in the pool, step 1 too starts from the
    pool (its ``n_first`` fresh seeds beside it).
    Fresh sources are candidates unless ``cfg.fresh_as`` is ``key`` (see `fresh_keys`);
    over ``cfg.max_candidates`` the pool is sampled with a seeded generator.
    """
    first = [CandidateSource.fresh(derive_seed(run_seed, task_id, 1, "fresh", k)) for k in range(cfg.n_first)]
    if step == 1 and not pool.has_step(0):
        return first
    if cfg.steps == "all":
        allowed = set(range(0, step))  # step 0: the user's scene image, where the task has one
    elif cfg.steps == "previous":
        allowed = {step - 1}
    else:
        allowed = set()
    pooled = [CandidateSource.pooled(j, k) for j, k in pool.keys() if j in allowed and k in cfg.iterations]
    fresh = first if step == 1 else [] if cfg.fresh_as == "key" else fresh_sources(step, cfg, run_seed, task_id)
    room = None if cfg.max_candidates is None else max(cfg.max_candidates - len(fresh), 0)
    if room is not None and len(pooled) > room:
        order = torch.randperm(len(pooled), generator=generator(derive_seed(run_seed, task_id, step, "pool-sample")))
        pooled = [pooled[i] for i in sorted(order[:room].tolist())]
    return pooled + fresh


def fresh_sources(step: int, cfg: PoolConfig, run_seed: int, task_id: str) -> list[CandidateSource]:
    return [CandidateSource.fresh(derive_seed(run_seed, task_id, step, "fresh", k)) for k in range(cfg.fresh)]


def fresh_keys(step: int, cfg: PoolConfig, run_seed: int, task_id: str) -> list[CandidateSource]:
    """With ``fresh_as: key``, the fresh renders of step i >= 2 join the past scenes the selector scores against."""
    return fresh_sources(step, cfg, run_seed, task_id) if cfg.fresh_as == "key" and step > 1 else []


def initial_latents(sources: list[CandidateSource], pool: LatentPool, shape: tuple[int, ...]) -> np.ndarray:
    """Stack the z_T of each candidate (float32): pooled latents as stored, fresh ones drawn from their seed."""
    stack = []
    for source in sources:
        if source.kind == "fresh":
            stack.append(gaussian_latent(source.seed, shape).numpy())
        else:
            stack.append(pool.latent(source.step, source.iteration).astype(np.float32))
    return np.stack(stack)
