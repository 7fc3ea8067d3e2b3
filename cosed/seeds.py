"""Every random draw of a run derives from (run seed, task id, step, role, index).

A shared generator would make results depend on call order, worker count and
retries; hashing the coordinates makes each draw addressable on its own.
"""

from __future__ import annotations

import hashlib

import torch

_SEED_BITS = 63


def derive_seed(run_seed: int, task_id: str, step: int, role: str, index: int = 0) -> int:
    """A 63-bit seed that depends only on its coordinates."""
    key = f"{int(run_seed)}\x1f{task_id}\x1f{int(step)}\x1f{role}\x1f{int(index)}".encode("utf-8")
    digest = hashlib.sha256(key).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def generator(seed: int) -> torch.Generator:
    """A CPU generator: CPU draws are identical on every machine, GPU draws are not."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def gaussian_latent(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial latent z_T of a fresh-seed diffusion run."""
    return torch.randn(shape, generator=generator(seed), dtype=torch.float32)
