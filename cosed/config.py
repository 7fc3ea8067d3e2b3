"""One `RunConfig` passed down everywhere, built from profile defaults, a YAML file and CLI flags.

Precedence: dataclass defaults < the profile's ``defaults`` < ``--config`` file < explicit flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosed.errors import UserError
from cosed.presets import apply_preset, check as check_preset


TRANSITIONS = ("cut", "dissolve", "keyframe")


class ConfigError(UserError, ValueError):
    """A config file or value that cannot be used; the message names the key."""


@dataclass
class SDConfig:
    """Text-to-image settings; `None` means: take the profile's value."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 8
    # None under the legacy preset; the paper preset sets the reference's (cosed.presets). FLUX ignores it
    # (guidance-distilled: no classifier-free guidance, nothing to be negative against).
    negative_prompt: str | None = None


@dataclass
class PoolConfig:
    """The latent pool of method.md §2: which runs and iterations feed later steps.

    ``max_candidates: null`` caps nothing (the paper and the reference); a
    number samples the pool with a seeded generator. ``fresh_as: key`` renders
    the fresh-seed images as extra past scenes for the selector (the
    reference) instead of as candidates. README "Selector variants" compares
    each option with the paper and the reference.
    """

    iterations: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: str = "all"
    fresh: int = 1
    n_first: int = 4
    max_candidates: int | None = None
    fresh_as: str = "candidate"


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
    # One seed for every clip (the reference: 42); None derives one per (run seed, task, step).
    seed: int | None = None


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
class ProcessResources:
    """What one task driver or writer asks of the scheduler: real requests, so Ray never piles hundreds of
    torch-importing processes on one node. Lowered at start to what the nodes have left once the model actors
    are placed (`policies.process_resources`), as auto CPUs of model actors are."""

    num_cpus: float = 0.5
    memory_gib: float = 1.5


@dataclass
class RayConfig:
    sd: PoolResources = field(default_factory=PoolResources)
    video: PoolResources = field(default_factory=PoolResources)
    clip: PoolResources = field(default_factory=PoolResources)
    caption: PoolResources = field(default_factory=PoolResources)  # the lm rewriter's captioner (only then)
    max_concurrent_tasks: int | str = "auto"
    task_retries: int = 2
    rescale_seconds: float = 5.0
    start_timeout_s: float = 900.0
    # Failure handling: a remote wait times out after max(floor, factor x the expected
    # call time, measured during the run); a call is tried on up to ``call_attempts``
    # actors. Deadlines measure work, never queueing: an attempt's sequencing gets ``sequence_deadline_s``
    # from its driver's start, its writer ``write_deadline_s`` from the writer's start; its clips wait
    # behind other tasks' clips with only their own call timeouts.
    call_timeout_factor: float = 10.0
    call_timeout_floor_s: float = 120.0
    call_attempts: int = 4
    sequence_deadline_s: float = 3600.0
    write_deadline_s: float = 1800.0
    # Rebalancing: after each window (at least three ``rescale_seconds`` and ``rebalance_window_calls``
    # calls of the slowest pool) one actor may move from a pool busy less than ``idle_below`` to one
    # busy more than ``busy_above``; 0 GPUs = do not ask the autoscaler.
    rebalance: bool = True
    busy_above: float = 0.85
    idle_below: float = 0.35
    rebalance_margin: float = 0.15   # after a move the donor must stay this much less busy (no ping-pong)
    rebalance_window_calls: int = 10
    # GPUs to ask an autoscaling cluster for, at most (0: never ask). "auto": the cluster's own maximum,
    # read from COSED_AUTOSCALE_MAX_GPUS (set by the shipped cluster files), else 0
    # (resolve_autoscale_max_gpus).
    autoscale_max_gpus: float | str = "auto"
    # Test-only fault injection: the first call of this pool ("sd", "video", "clip") that
    # creates the file ``chaos_stall_marker`` sleeps forever (tests of stuck-call handling).
    chaos_stall_kind: str | None = None
    chaos_stall_marker: str | None = None
    # Test-only: every call run by an actor of this pool takes ``chaos_slow_s`` longer (a slower GPU or
    # model; no byte changes), e.g. a video pool that falls behind so that clips wait.
    chaos_slow_kind: str | None = None
    chaos_slow_s: float = 0.0
    # Test-only: the first writer that creates this file exits its process before writing (Ray runs it again).
    chaos_writer_exit_marker: str | None = None
    # Test-only: the first model actor that creates this file fails its start (as a bad GPU or a download would).
    chaos_start_failure_marker: str | None = None
    # Test-only: the first driver that creates this file exits its process after the first scene of its second
    # task (its first task's clips are still rendering then).
    chaos_driver_exit_marker: str | None = None
    # A pool whose starts failed this many times in a row, with no member yet, fails the run at once.
    start_attempts: int = 3
    # Writers: how many at once ("auto": two per node) and where ("workers": off the head node when there are
    # other nodes; "any": wherever Ray puts them).
    writers: int | str = "auto"
    writer_nodes: str = "workers"
    # What each driver and writer asks for (lowered to what the nodes have left). They run only on nodes that
    # advertise the custom resource `cosed_worker` when any does (the shipped cluster files set it on GPU
    # workers), else off the head of a multi-node cluster (policies.host_nodes).
    driver_resources: ProcessResources = field(default_factory=ProcessResources)
    writer_resources: ProcessResources = field(default_factory=lambda: ProcessResources(num_cpus=0.5, memory_gib=1.0))
    # The smallest GPU (GiB) any pool may run on, for the memory plan ("auto": the smallest GPU in the cluster
    # at start). Set it when an autoscaling cluster can add smaller GPUs than it has at start.
    gpu_memory_gib: float | str = "auto"
    # Pool planning (cosed.distributed.sizing): "cost" sizes pools by expected GPU-seconds,
    # "legacy" splits GPUs evenly (kept to compare against).
    policy: str = "cost"
    # Where the models live: "pooled" pins SD, video and CLIP to GPUs of their own (the design). "shared"
    # (opt-in, for GPUs that hold SD and the video model together: H100/H200) loads the video model in every
    # SD actor too, so that once the input is used up the SD actors that go idle take the last clips
    # (`policies.lend_to_video`) instead of idling while the video pool drains. No byte changes.
    placement: str = "pooled"
    costs: dict = field(default_factory=dict)      # overrides of the profile's `costs`, same layout
    min_gpus: float = 0.0                          # wait (up to gpu_wait_s) until the cluster has this many
    gpu_wait_s: float = 600.0


@dataclass
class StorageConfig:
    """How long one storage call may keep retrying (unreachable: an outage; answering SlowDown: throttling),
    and how long an output lease lasts unrenewed."""

    retry_seconds: float = 120.0
    throttle_seconds: float = 1800.0
    lease_seconds: float = 120.0


@dataclass
class RunConfig:
    # Which bundle of reference settings this run started from (cosed.presets): ``legacy`` here, ``paper`` as
    # the CLI default of generate / evaluate / reproduce. Its values are in the fields below.
    preset: str = "legacy"
    # How scenes are made (cosed.evaluate.METHODS): cosed, independent and chain differ in pool policy only;
    # mora starts each scene i >= 2 from the last frame of clip i-1 (no text-to-image after step 1).
    method: str = "cosed"
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
    # GPU memory plan: auto (savers only when the GPU is too small), off, savers or offload (cosed.memory).
    memory: str = "auto"
    # The level each pool runs at, resolved once per run from ``memory`` and the smallest GPU (pools that need
    # more than the plain plan only). Set by the runners, not by hand: it is part of every task's fingerprint.
    memory_plan: dict = field(default_factory=dict)
    selector_mode: str = "full"
    # Cut captions to this many characters before the selector's CLIP text embeddings (the reference: 77);
    # None: the whole caption (already cut to CLIP's 77 tokens).
    selector_text_chars: int | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)
    # How one scene's clip meets the next (`cosed.transitions`): cut (hard cuts), dissolve (a cross-fade of
    # ``transition_frames`` frames, made before encoding) or keyframe (scene i's clip also ends on scene i+1's
    # image; video models that take a last frame only). Part of the fingerprint only when not cut.
    transitions: str = "cut"
    transition_frames: int = 4

    def validate(self) -> "RunConfig":
        check_preset(self.preset)
        if self.method not in ("cosed", "independent", "chain", "mora", "t2v", "talc"):
            raise ConfigError(f"method must be cosed, independent, chain, mora, t2v or talc, got {self.method!r}")
        if self.selector_text_chars is not None and self.selector_text_chars < 1:
            raise ConfigError("selector_text_chars must be positive (or null: the whole caption)")
        for section in (self.sd, self.video):
            name = "sd" if section is self.sd else "video"
            for key in ("height", "width"):
                value = getattr(section, key)
                if value is not None and (value < 8 or value % 8):
                    raise ConfigError(f"{name}.{key} must be a positive multiple of 8, got {value}")
        for key in ("num_frames", "fps", "num_inference_steps", "decode_chunk_size"):
            value = getattr(self.video, key)
            if value is not None and value < 1:
                raise ConfigError(f"video.{key} must be positive, got {value}")
        if self.sd.num_inference_steps is not None and self.sd.num_inference_steps < 1:
            raise ConfigError("sd.num_inference_steps must be positive")
        if self.storage.retry_seconds < 0 or self.storage.throttle_seconds < 0 or self.storage.lease_seconds < 10:
            raise ConfigError("storage.retry_seconds and storage.throttle_seconds must be >= 0 and "
                              "storage.lease_seconds >= 10")
        pool = self.pool
        if pool.steps not in ("all", "previous", "none"):
            raise ConfigError(f"pool.steps must be all, previous or none, got {pool.steps!r}")
        if not pool.iterations or any(k < 1 for k in pool.iterations):
            raise ConfigError("pool.iterations must list iterations numbered from 1")
        if pool.fresh < 0 or pool.n_first < 1:
            raise ConfigError("pool.fresh must be >= 0 and pool.n_first >= 1")
        if pool.steps == "none" and pool.fresh < 1:
            raise ConfigError("pool.steps none needs pool.fresh >= 1")
        if pool.fresh_as not in ("candidate", "key"):
            raise ConfigError(f"pool.fresh_as must be candidate or key, got {pool.fresh_as!r}")
        if pool.fresh_as == "key" and pool.steps == "none":
            raise ConfigError("pool.fresh_as key leaves pool.steps none without candidates")
        fresh_candidates = pool.fresh if pool.fresh_as == "candidate" else 0
        if pool.max_candidates is not None and pool.max_candidates < max(fresh_candidates, 1):
            raise ConfigError("pool.max_candidates must be at least max(pool.fresh, 1) (or null: no cap)")
        if self.selector_mode not in ("full", "text", "image", "clip"):
            raise ConfigError(f"selector_mode must be full, text, image or clip, got {self.selector_mode!r}")
        if self.sd.num_inference_steps is not None and max(pool.iterations) > self.sd.num_inference_steps:
            raise ConfigError("pool.iterations go past sd.num_inference_steps")
        if self.sd.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("sd.batch_size and max_steps must be positive")
        if self.transitions not in TRANSITIONS:
            raise ConfigError(f"transitions must be {', '.join(TRANSITIONS)}, got {self.transitions!r}")
        if self.transition_frames < 1:
            raise ConfigError(f"transition_frames must be >= 1, got {self.transition_frames}")
        if self.memory not in ("auto", "off", "savers", "offload"):
            raise ConfigError(f"memory must be auto, off, savers or offload, got {self.memory!r}")
        gpus = self.ray.autoscale_max_gpus
        if gpus != "auto" and (gpus < 0 or not math.isfinite(gpus)):
            raise ConfigError(f"ray.autoscale_max_gpus must be 'auto' or a number >= 0, got {gpus!r}")
        for name in ("driver_resources", "writer_resources"):
            asked = getattr(self.ray, name)
            if asked.num_cpus < 0 or asked.memory_gib < 0:
                raise ConfigError(f"ray.{name}: num_cpus and memory_gib must be >= 0")
        if self.ray.placement not in ("pooled", "shared"):
            raise ConfigError(f"ray.placement must be pooled or shared, got {self.ray.placement!r}")
        if self.ray.writer_nodes not in ("workers", "any"):
            raise ConfigError(f"ray.writer_nodes must be workers or any, got {self.ray.writer_nodes!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_defaults(self, defaults: dict[str, Any]) -> "RunConfig":
        """Fill the fields left as None from a profile's defaults.

        ``rewriter_model`` (the profile's captioner) fills in only under ``rewriter: lm``: under any
        other rewriter no model decides the captions, and the config (part of every task's
        fingerprint) stays as it was.
        """
        merged = self.to_dict()
        for section, values in defaults.items():
            if section == "rewriter_model":
                if merged["rewriter"] == "lm" and merged["rewriter_model"] is None:
                    merged["rewriter_model"] = values
                continue
            for key, value in values.items():
                if key not in merged[section]:
                    raise ConfigError(f"profile default {section}.{key} is not a config key")
                if merged[section].get(key) is None:
                    merged[section][key] = value
        return from_dict(merged)


AUTOSCALE_ENV = "COSED_AUTOSCALE_MAX_GPUS"


def resolve_autoscale_max_gpus(value: float | str, environ: Mapping[str, str] | None = None) -> float:
    """``ray.autoscale_max_gpus`` as a number: ``"auto"`` reads COSED_AUTOSCALE_MAX_GPUS, which the
    shipped cluster files set to their maximum GPUs (workers' max x GPUs per worker), else 0 (never ask).

    Read where the job runs (the head), so one config serves every cluster and a laptop alike.
    """
    if value != "auto":
        return float(value)
    raw = (os.environ if environ is None else environ).get(AUTOSCALE_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        gpus = float(raw)
    except ValueError:
        gpus = -1.0
    if gpus < 0 or not math.isfinite(gpus):
        raise ConfigError(f"{AUTOSCALE_ENV} must be a number of GPUs >= 0, got {raw!r}")
    return gpus


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) in {where or 'top level'}: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {name!r} must be a mapping")
            value = _build(type(default), value, f"{where}.{name}" if where else name)
        else:
            value = _checked(value, hints[name], f"{where}.{name}" if where else name)
        kwargs[name] = value
    return cls(**kwargs)


def _type_name(hint) -> str:
    return " or ".join(getattr(t, "__name__", str(t)).replace("NoneType", "null")
                       for t in (typing.get_args(hint) if _is_union(hint) else (hint,)))


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _checked(value: Any, hint, key: str) -> Any:
    """``value`` if it has the field's type (an int is a float; "auto" is the only string for int | str)."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            if int in options or float in options:
                if value != "auto":
                    raise ConfigError(f"config key {key} must be a number or 'auto', got {value!r}")
            return value
        if (option is dict or typing.get_origin(option) is dict) and isinstance(value, dict):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            return [_checked(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"config key {key} must be {_type_name(hint)}, got {value!r}")


def from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data, "").validate()


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None,
                default_preset: str | None = None) -> RunConfig:
    """A RunConfig from an optional YAML file plus dotted overrides like ``{"pool.fresh": 2}``.

    The preset named by an override, else the file, else ``default_preset`` fills the keys neither sets
    (`cosed.presets`); with none, the dataclass defaults (the legacy preset) stand.
    """
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not a readable text file: {exc}") from exc
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise ConfigError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    preset = data.get("preset") or default_preset
    if preset:
        data = apply_preset(preset, data)
    return from_dict(data)
