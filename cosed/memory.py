"""GPU memory plans: which memory savers a GPU of a given size needs for a profile.

`plan_memory` is pure: the profile's expected peak memory per plan level (data
in the profile JSON, GiB at its default settings) against the GPU's memory.
``auto`` picks the first level that fits, so savers cost speed only where the
GPU is too small; ``off`` keeps the plain plan. A plan that fits nowhere is an
error, never a silent start.

Savers change output bytes (attention and VAE slicing reorder float sums, a
smaller ``decode_chunk_size`` decodes other frames), so the level is decided once
per run and pool (`resolve_memory_plan`, from the smallest GPU the pool may run
on), written into the run config and so into every task's fingerprint; a model
process only checks that its GPU can hold the level it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cosed.errors import UserError

LEVELS = ("plain", "savers", "offload")
SAVERS = {
    "plain": (),
    "savers": ("vae_slicing", "vae_tiling", "attention_slicing", "decode_chunk_size<=2"),
    "offload": ("vae_slicing", "vae_tiling", "attention_slicing", "decode_chunk_size<=2", "model_cpu_offload"),
}
# Room left for the CUDA context, fragmentation and the other process on the GPU.
HEADROOM = 0.9
SMALL_DECODE_CHUNK = 2


class InsufficientGPUMemory(UserError, RuntimeError):
    """The GPU is too small for the profile even with every memory saver; the message says what to do."""


@dataclass(frozen=True)
class MemoryPlan:
    level: str
    need_gib: float | None = None
    gpu_gib: float | None = None
    savers: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if self.gpu_gib is None:
            return "no GPU: plain plan on the CPU"
        need = "unknown" if self.need_gib is None else f"{self.need_gib:.0f} GiB"
        return f"{self.level} (needs {need} of {self.gpu_gib:.0f} GiB){': ' + ', '.join(self.savers) if self.savers else ''}"


def plan_memory(needs: dict[str, float | None], gpu_gib: float | None, mode: str = "auto",
                what: str = "this profile") -> MemoryPlan:
    """The memory plan for models whose peak needs per level are ``needs`` on a GPU of ``gpu_gib`` GiB.

    ``gpu_gib`` None means no GPU (nothing to plan). Needs of None (a profile
    that does not say) count as fitting.
    """
    if gpu_gib is None:
        return MemoryPlan("plain")
    budget = gpu_gib * HEADROOM
    if mode in ("off", "plain"):
        candidates = ("plain",)
    elif mode == "auto":
        candidates = LEVELS
    elif mode in LEVELS:
        candidates = (mode,)
    else:
        raise ValueError(f"memory must be auto, off, savers or offload, got {mode!r}")
    for level in candidates:
        need = needs.get(level)
        if need is None or need <= budget:
            return MemoryPlan(level, need, gpu_gib, SAVERS[level])
    last = candidates[-1]
    hint = ("set memory: auto to turn memory savers on, " if mode != "auto" else "")
    raise InsufficientGPUMemory(
        f"{what} needs about {needs[last]:.0f} GiB of GPU memory with the {last} plan but the GPU has "
        f"{gpu_gib:.0f} GiB: {hint}use a larger GPU (README: Running on GPUs lists the needs), "
        "give each model pool its own GPU (ray: sd/video num_gpus: 1), or use --profile tiny.")


def resolve_memory_plan(needs: dict[str, dict[str, float | None]], gpu_gib: float | None,
                        mode: str = "auto") -> dict[str, str]:
    """Per pool, the memory plan level on a GPU of ``gpu_gib`` GiB (the smallest the pool may run on).

    ``needs`` maps each pool to its GPU's peak needs per level (the models that share
    that GPU). Only pools that need more than the plain plan are listed, so a plain
    run's config, and its fingerprint, do not depend on the GPUs at all.
    """
    levels = {pool: plan_memory(pool_needs, gpu_gib, mode, what=f"the {pool} pool").level
              for pool, pool_needs in needs.items()}
    return {pool: level for pool, level in sorted(levels.items()) if level != "plain"}


def decode_chunk_for(level: str, decode_chunk_size: int | None) -> int | None:
    """The video decode chunk a plan level allows (savers decode two frames at a time)."""
    if level != "plain" and decode_chunk_size:
        return min(decode_chunk_size, SMALL_DECODE_CHUNK)
    return decode_chunk_size


def gpu_memory_gib(device) -> float | None:
    """Total memory of a CUDA device in GiB, None on the CPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def apply_memory_plan(pipe, plan: MemoryPlan, device) -> object:
    """Turn the plan's savers on for a loaded pipeline and place it on ``device``.

    Savers a model family does not implement (SVD's temporal VAE has no slicing) are skipped.
    """
    savers = set(plan.savers)
    vae = getattr(pipe, "vae", None)
    wanted = [(vae, "enable_slicing", "vae_slicing"), (vae, "enable_tiling", "vae_tiling"),
              (pipe, "enable_attention_slicing", "attention_slicing")]
    for owner, method, saver in wanted:
        if saver in savers and hasattr(owner, method):
            try:
                getattr(owner, method)()
            except NotImplementedError:
                pass
    if "model_cpu_offload" in savers:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)
