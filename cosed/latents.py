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

    def latent(self, step: int, iteration: int) -> np.ndarray:
        return self._latents[(step, iteration)]


def plan_candidates(step: int, pool: LatentPool, cfg: PoolConfig, run_seed: int, task_id: str) -> list[CandidateSource]:
    """The candidate sources of one step, in a fixed order: pool (by step, iteration), then fresh."""
    if step == 1:
        return [CandidateSource.fresh(derive_seed(run_seed, task_id, 1, "fresh", k)) for k in range(cfg.n_first)]
    if cfg.steps == "all":
        allowed = set(range(1, step))
    elif cfg.steps == "previous":
        allowed = {step - 1}
    else:
        allowed = set()
    pooled = [CandidateSource.pooled(j, k) for j, k in pool.keys() if j in allowed and k in cfg.iterations]
    room = max(cfg.max_candidates - cfg.fresh, 0)
    if len(pooled) > room:
        order = torch.randperm(len(pooled), generator=generator(derive_seed(run_seed, task_id, step, "pool-sample")))
        pooled = [pooled[i] for i in sorted(order[:room].tolist())]
    fresh = [CandidateSource.fresh(derive_seed(run_seed, task_id, step, "fresh", k)) for k in range(cfg.fresh)]
    return pooled + fresh


def initial_latents(sources: list[CandidateSource], pool: LatentPool, shape: tuple[int, ...]) -> np.ndarray:
    """Stack the z_T of each candidate (float32): pooled latents as stored, fresh ones drawn from their seed."""
    stack = []
    for source in sources:
        if source.kind == "fresh":
            stack.append(gaussian_latent(source.seed, shape).numpy())
        else:
            stack.append(pool.latent(source.step, source.iteration).astype(np.float32))
    return np.stack(stack)
