"""How many model actors of each kind, and what each asks for, from the cluster's resources."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cosed.config import PoolResources, RayConfig

KINDS = ("sd", "video", "clip")
_EPS = 1e-6


@dataclass(frozen=True)
class PoolPlan:
    replicas: int
    num_gpus: float
    num_cpus: float


def plan_pools(ray_cfg: RayConfig, cluster_gpus: float, cluster_cpus: float,
               fixed_gpus: dict[str, float] | None = None) -> dict[str, PoolPlan]:
    """Pool sizes for a cluster. ``fixed_gpus`` keeps each pool's per-actor share once chosen.

    Fixed replica counts are honoured first; pools with ``replicas: auto`` share
    the GPUs left, text-to-image first since it runs the most denoising passes.
    On a CPU-only cluster an auto pool gets one actor per three CPU slots.
    """
    specs: dict[str, PoolResources] = {kind: getattr(ray_cfg, kind) for kind in KINDS}
    gpus = {kind: (fixed_gpus or {}).get(kind, _num_gpus(spec.num_gpus, cluster_gpus)) for kind, spec in specs.items()}
    cpus = {kind: _num_cpus(spec.num_cpus, cluster_cpus) for kind, spec in specs.items()}
    replicas = {kind: int(spec.replicas) for kind, spec in specs.items() if spec.replicas != "auto"}
    auto = [kind for kind in KINDS if kind not in replicas]
    gpu_auto = [k for k in auto if gpus[k] > 0]
    for kind in auto:
        if gpus[kind] == 0:
            replicas[kind] = max(1, int(cluster_cpus // (len(KINDS) * max(cpus[kind], _EPS))))
    if gpu_auto:
        left = cluster_gpus - sum(replicas[k] * gpus[k] for k in replicas if gpus[k] > 0)
        share = max(left, 0) / len(gpu_auto)
        for kind in gpu_auto:
            replicas[kind] = max(1, math.floor(share / gpus[kind] + _EPS))
        spare = left - sum(replicas[k] * gpus[k] for k in gpu_auto)
        first = gpu_auto[0]
        replicas[first] += max(0, math.floor(spare / gpus[first] + _EPS))
    return {kind: PoolPlan(replicas=replicas[kind], num_gpus=gpus[kind], num_cpus=cpus[kind]) for kind in KINDS}


def _num_gpus(value: float | str, cluster_gpus: float) -> float:
    if value != "auto":
        return float(value)
    if cluster_gpus <= 0:
        return 0.0
    return 1.0 if cluster_gpus >= len(KINDS) else _share(cluster_gpus)


def _num_cpus(value: float | str, cluster_cpus: float) -> float:
    if value != "auto":
        return float(value)
    return 1.0 if cluster_cpus >= len(KINDS) else _share(cluster_cpus)


def _share(total: float) -> float:
    """A third of ``total``, rounded down so that three shares always fit."""
    return math.floor(total / len(KINDS) * 1e4) / 1e4
