"""A run's plan: one value, built in one place before anything acts on it, stored under the output.

What decides a task's bytes, beyond the task itself, comes from the profile and the run
config, plus one fact about the run's target cluster: the GPU size the byte-changing memory
savers are planned for (`cosed.memory`), for each pool on GPUs of its own as the design pins
it — never from how many GPUs happen to be up. That size is declared (``ray.gpu_memory_gib``)
or, where it is not, the smallest GPU found when the output's plan was first made.

The plan is stored at ``OUT/.cosed-run/plan.json``. Every later run into that output (a
resubmit on a cluster that grew, shrank or changed GPU type) reuses it, so no finished task's
fingerprint moves because the cluster did. A run whose cluster would plan otherwise says so
in one line and keeps the stored plan; ``--replan`` takes the new one (and so redoes the tasks
whose bytes it changes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Callable

from cosed import storage
from cosed.config import RunConfig, resolve_autoscale_max_gpus
from cosed.memory import LEVELS, decode_chunk_for, resolve_memory_plan
from cosed.models.profiles import KINDS, Profile, available_profiles, profile_data, resolve_profile
from cosed.transitions import check_keyframes

log = logging.getLogger("cosed")

PLAN = ".cosed-run/plan.json"
VERSION = 1
RANDOM_WEIGHTS = ("note: RANDOM WEIGHTS: this profile's models are random-weight twins, so images are noise and "
                  "metrics say nothing about quality (real videos: --profile sd21-svd or flux-ltx)")


def resolve_run(cfg: RunConfig) -> tuple[Profile, RunConfig]:
    """The profile and the config with the profile's defaults filled in."""
    profile = resolve_profile(cfg.profile, cfg.cache_dir)
    check_keyframes(profile, profile.spec("video").pipeline, cfg, keyframe_profiles())
    return profile, cfg.with_defaults(profile.defaults)


def keyframe_profiles() -> list[str]:
    """The named profiles whose video model can end a clip on the next scene (`--transitions keyframe`)."""
    from cosed.models.adapters import supports_keyframes

    named = {name: profile_data(name)["models"].get("video") for name in available_profiles()}
    return [name for name, video in named.items()
            if isinstance(video, dict) and supports_keyframes(video.get("pipeline"))]


def pinned_shares(profile: Profile, cfg: RunConfig) -> dict[str, tuple[str, ...]]:
    """The models the design pins to each pool's GPU: a whole-GPU model (SD, video) alone, with the guests
    (CLIP) that may share any host's GPU. Where a cluster has fewer GPUs than that, its processes share
    more and add CPU offload, which changes no byte (`cosed.memory.actor_memory_plan`)."""
    from cosed.distributed.costs import CostModel

    whole_gpu = CostModel.from_dict(profile.costs, cfg.ray.costs).whole_gpu
    whole = [k for k in KINDS if whole_gpu.get(k, True)]
    guests = tuple(k for k in KINDS if k not in whole)
    return {kind: (kind, *guests) if kind in whole else (kind,) for kind in KINDS}


def with_memory_plan(cfg: RunConfig, profile: Profile, gpu_gib: float | None) -> RunConfig:
    """``cfg`` with each pool's byte level for GPUs of ``gpu_gib`` GiB, and the smaller video decode chunk
    that savers bring: both part of every task's fingerprint."""
    needs = {pool: {level: profile.memory_gib(level, kinds) for level in LEVELS}
             for pool, kinds in pinned_shares(profile, cfg).items()}
    plan = resolve_memory_plan(needs, gpu_gib, cfg.memory)
    video = dataclasses.replace(cfg.video, decode_chunk_size=decode_chunk_for(plan.get("video", "plain"),
                                                                              cfg.video.decode_chunk_size))
    return dataclasses.replace(cfg, memory_plan=plan, video=video)


@dataclass(frozen=True)
class RunPlan:
    """Everything a run acts on that is not a task: the profile, the resolved config (profile defaults and the
    byte plan filled in) and where the planned GPU size came from (declared, probed, none or stored)."""

    profile: Profile
    cfg: RunConfig
    gpu_gib: float | None
    gpu_from: str
    reused: bool = False

    def record(self) -> dict:
        """What plan.json holds: what decides bytes, and the target it was planned for."""
        return {"version": VERSION, "profile": self.profile.name, "memory": self.cfg.memory,
                "gpu_memory_gib": self.gpu_gib, "gpu_from": self.gpu_from,
                "memory_plan": dict(self.cfg.memory_plan),
                "video_decode_chunk_size": self.cfg.video.decode_chunk_size,
                "autoscale_max_gpus": resolve_autoscale_max_gpus(self.cfg.ray.autoscale_max_gpus)}

    def describe(self) -> str:
        gpu = "no GPU size (plain)" if self.gpu_gib is None else f"{self.gpu_gib:g} GiB GPUs ({self.gpu_from})"
        levels = ", ".join(f"{k} {v}" for k, v in self.cfg.memory_plan.items()) or "every pool plain"
        return f"{self.profile.name}, planned for {gpu}: {levels}" + (" (stored plan reused)" if self.reused else "")


def read_plan(out: str) -> dict | None:
    """The output's stored plan, None where there is none (or it is unreadable: then it is made anew)."""
    try:
        record = json.loads(storage.read_bytes(storage.join(out, PLAN)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("the stored run plan %s is unreadable; making a new one", storage.join(out, PLAN))
        return None
    return record if isinstance(record, dict) and record.get("version") == VERSION else None


def plan_run(cfg: RunConfig, out: str, probe_gpu_gib: Callable[[], float | None] = lambda: None,
             replan: bool = False, say: Callable[[str], None] = print) -> RunPlan:
    """The run's plan: the output's stored plan where it applies (same profile and memory mode), else one
    made for the declared GPU size or ``probe_gpu_gib()`` and stored. ``say`` gets the one line a run prints
    when the stored plan differs from what this cluster would give, or is replaced."""
    profile, cfg = resolve_run(cfg)
    if profile.random_weights:
        say(f"[cosed] profile {profile.name}: {RANDOM_WEIGHTS}")
    declared = None if cfg.ray.gpu_memory_gib == "auto" else float(cfg.ray.gpu_memory_gib)
    stored = read_plan(out)
    applies = stored is not None and stored.get("profile") == profile.name and stored.get("memory") == cfg.memory
    here_gib = declared if declared is not None else probe_gpu_gib()
    here = RunPlan(profile, with_memory_plan(cfg, profile, here_gib), here_gib,
                   "declared" if declared is not None else ("probed" if here_gib is not None else "none"))
    if applies and not replan:
        kept = RunPlan(profile, with_memory_plan(cfg, profile, stored["gpu_memory_gib"]), stored["gpu_memory_gib"],
                       stored.get("gpu_from", "stored"), reused=True)
        if here.cfg.memory_plan != kept.cfg.memory_plan:
            say(f"[cosed] this cluster would plan {here.describe()}; keeping the output's stored plan "
                f"({kept.describe()}) so finished tasks stay valid: pass --replan to use the new one")
        return kept
    if stored is not None:
        why = "--replan" if applies else "another profile or memory mode"
        say(f"[cosed] replacing the output's stored run plan ({why}): {here.describe()}")
    storage.write_text(storage.join(out, PLAN), json.dumps(here.record(), indent=2) + "\n")
    return here
