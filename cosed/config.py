"""One `RunConfig` passed down everywhere, built from profile defaults, a YAML file and CLI flags.

Precedence: dataclass defaults < the profile's ``defaults`` < ``--config`` file < explicit flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class SDConfig:
    """Text-to-image settings; `None` means: take the profile's value."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 8


@dataclass
class PoolConfig:
    """The latent pool of method.md §2: which runs and iterations feed later steps."""

    iterations: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: str = "all"
    fresh: int = 1
    n_first: int = 4
    max_candidates: int = 16


@dataclass
class VideoConfig:
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    decode_chunk_size: int | None = None
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02


@dataclass
class PoolResources:
    """One model pool on Ray: how many actors and what each asks of the scheduler.

    ``replicas: auto`` sizes the pool from the cluster at start (and grows it when
    GPUs are added); ``num_gpus: auto`` is 1 when the cluster has a GPU per pool,
    a fractional share on smaller GPU nodes, and 0 on CPU-only clusters;
    ``num_cpus: auto`` is 1, or a third of the cluster's CPUs when it has fewer than 3.
    """

    replicas: int | str = "auto"
    num_gpus: float | str = "auto"
    num_cpus: float | str = "auto"


@dataclass
class RayConfig:
    sd: PoolResources = field(default_factory=PoolResources)
    video: PoolResources = field(default_factory=PoolResources)
    clip: PoolResources = field(default_factory=lambda: PoolResources(replicas=1))
    max_concurrent_tasks: int | str = "auto"
    task_retries: int = 2
    rescale_seconds: float = 5.0
    start_timeout_s: float = 900.0
    # Pool planning (cosed.distributed.sizing): "cost" sizes pools by expected GPU-seconds,
    # "legacy" splits GPUs evenly (kept to compare against).
    policy: str = "cost"
    costs: dict = field(default_factory=dict)      # overrides of the profile's `costs`, same layout
    min_gpus: float = 0.0                          # wait (up to gpu_wait_s) until the cluster has this many
    gpu_wait_s: float = 600.0


@dataclass
class RunConfig:
    profile: str = "tiny"
    seed: int = 0
    rewriter: str = "template"
    rewriter_model: str | None = None
    selector: str | None = None
    max_steps: int = 12
    device: str = "auto"
    cpu_threads: int = 1
    save_candidates: bool = False
    cache_dir: str | None = None
    sd: SDConfig = field(default_factory=SDConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> "RunConfig":
        pool = self.pool
        if pool.steps not in ("all", "previous", "none"):
            raise ValueError(f"pool.steps must be all, previous or none, got {pool.steps!r}")
        if not pool.iterations or any(k < 1 for k in pool.iterations):
            raise ValueError("pool.iterations must list iterations numbered from 1")
        if pool.fresh < 0 or pool.n_first < 1:
            raise ValueError("pool.fresh must be >= 0 and pool.n_first >= 1")
        if pool.steps == "none" and pool.fresh < 1:
            raise ValueError("pool.steps none needs pool.fresh >= 1")
        if pool.max_candidates < max(pool.fresh, 1):
            raise ValueError("pool.max_candidates must be at least max(pool.fresh, 1)")
        if self.sd.num_inference_steps is not None and max(pool.iterations) > self.sd.num_inference_steps:
            raise ValueError("pool.iterations go past sd.num_inference_steps")
        if self.sd.batch_size < 1 or self.max_steps < 1:
            raise ValueError("sd.batch_size and max_steps must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_defaults(self, defaults: dict[str, Any]) -> "RunConfig":
        """Fill the fields left as None from a profile's defaults."""
        merged = self.to_dict()
        for section, values in defaults.items():
            for key, value in values.items():
                if key not in merged[section]:
                    raise ValueError(f"profile default {section}.{key} is not a config key")
                if merged[section].get(key) is None:
                    merged[section][key] = value
        return from_dict(merged)


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) in {where or 'top level'}: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config section {name!r} must be a mapping")
            value = _build(type(default), value, name)
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data, "").validate()


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from an optional YAML file plus dotted overrides like ``{"pool.fresh": 2}``."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return from_dict(data)
