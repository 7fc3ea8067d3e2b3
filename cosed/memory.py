"""GPU memory plans: which memory savers a GPU of a given size needs for a profile.

`plan_memory` is pure: the profile's expected peak memory per plan level (data
in the profile JSON, GiB at its default settings) against the GPU's memory.
``auto`` picks the first level that fits, so savers cost speed only where the
GPU is too small; ``off`` keeps the plain plan. A plan that fits nowhere is an
error, never a silent start.

Two kinds of saver. *Byte savers* change output bytes (attention and VAE slicing
reorder float sums, a smaller ``decode_chunk_size`` decodes other frames), so
their level (``plain`` or ``savers``) is decided once per run and pool, for the
pool on GPUs of its own as the design pins it (`resolve_memory_plan`): never from
how many GPUs happen to be up. The run plan (`cosed.runplan`) stores it under the
output, and it is part of every task's fingerprint. *CPU offload* changes no
byte (the same kernels run, the weights only travel), so each model process
adds it on its own when the GPU it landed on, shared with the models placed
beside it, cannot hold its level otherwise (`actor_memory_plan`).
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


BYTE_LEVELS = ("plain", "savers")
OFFLOAD = "model_cpu_offload"


def byte_level(needs: dict[str, float | None], gpu_gib: float | None, mode: str = "auto",
               what: str = "this profile") -> str:
    """The byte-deciding level (``plain`` or ``savers``) of models whose peak needs per level are ``needs``,
    on a GPU of ``gpu_gib`` GiB. CPU offload is not decided here (it changes no byte): a pool that needs it
    to fit gets ``savers`` and its processes add offload (`actor_memory_plan`). Raises where nothing fits."""
    if gpu_gib is None:
        return "plain"
    if mode in ("savers", "offload"):
        return "savers"
    plain = needs.get("plain")
    if plain is None or plain <= gpu_gib * HEADROOM:
        return "plain"
    if mode in ("off", "plain"):
        plan_memory(needs, gpu_gib, "off", what)  # raises, saying what to do
    plan_memory(needs, gpu_gib, "auto", what)  # raises when even offload does not fit
    return "savers"


def resolve_memory_plan(needs: dict[str, dict[str, float | None]], gpu_gib: float | None,
                        mode: str = "auto") -> dict[str, str]:
    """Per pool, the byte-deciding level on a GPU of ``gpu_gib`` GiB (the run's target GPU).

    ``needs`` maps each pool to its GPU's peak needs per level (the models the design
    pins to that GPU). Only pools that need more than the plain plan are listed, so a
    plain run's config, and its fingerprint, do not depend on the GPUs at all.
    """
    levels = {pool: byte_level(pool_needs, gpu_gib, mode, what=f"the {pool} pool")
              for pool, pool_needs in needs.items()}
    return {pool: level for pool, level in sorted(levels.items()) if level != "plain"}


def actor_memory_plan(level: str, needs: dict[str, float | None], gpu_gib: float | None, mode: str = "auto",
                      what: str = "this profile") -> MemoryPlan:
    """What one model process runs with: the run's byte level for its pool, plus CPU offload when its GPU
    (``gpu_gib``, with the models placed beside it: ``needs``) cannot hold that level otherwise, or when
    ``memory: offload`` asks for it. Offload changes no byte, so this may differ from process to process."""
    savers = SAVERS[level if level in BYTE_LEVELS else "savers"]
    if gpu_gib is None:
        return MemoryPlan(level, None, None, savers)
    budget = gpu_gib * HEADROOM
    need = needs.get(level)
    if mode != "offload" and (need is None or need <= budget):
        return MemoryPlan(level, need, gpu_gib, savers)
    offloaded = needs.get("offload")
    if mode in ("auto", "offload") and (offloaded is None or offloaded <= budget):
        return MemoryPlan(level, offloaded, gpu_gib, savers + (OFFLOAD,))
    hint = "set memory: auto to allow CPU offload, " if mode not in ("auto", "offload") else ""
    shown = offloaded if mode in ("auto", "offload") and offloaded is not None else need
    raise InsufficientGPUMemory(
        f"{what} needs about {shown:.0f} GiB of GPU memory on this GPU but it has {gpu_gib:.0f} GiB: {hint}use a "
        "larger GPU, give each model pool its own GPU (ray: sd/video num_gpus: 1), or use --profile tiny.")


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
    if OFFLOAD in savers:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)
