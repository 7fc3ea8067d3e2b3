"""The cheap determinism options every model process sets on its device, and their record in the manifest.

A retried step may run on another GPU of the pool: autotuned cuDNN kernels,
TF32 matmuls and nondeterministic atomics would let the same request give other
pixels there. The options below cost little (cuBLAS keeps a small fixed
workspace; deterministic algorithms only warn where an op has none). They cannot
make two GPU types agree bit for bit, which is why a scene is stored once and its
clip is bound to its bytes (`cosed.steps`). On the CPU the thread count decides
float reductions (`RunConfig.cpu_threads`, set by `LocalBackend`).
"""

from __future__ import annotations

import os

CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results (about 24 MiB)


def settings(device_type: str, cpu_threads: int) -> dict:
    """What applies on a device of this type (pure: the manifest records it, `apply` sets it)."""
    if device_type == "cuda":
        return {"cudnn_benchmark": False, "cudnn_deterministic": True, "matmul_allow_tf32": False,
                "cudnn_allow_tf32": False, "deterministic_algorithms": "warn_only",
                "cublas_workspace_config": CUBLAS_WORKSPACE}
    return {"cpu_threads": cpu_threads}


def record(cpu_threads: int) -> dict:
    """The manifest's ``determinism``: the options of both device types, so the record depends on the run
    config alone (never on the node a writer ran on)."""
    return {"cuda": settings("cuda", cpu_threads), "cpu": settings("cpu", cpu_threads)}


_cuda_set = False


def apply(device_type: str, cpu_threads: int) -> dict:
    """Set this device type's options (the CUDA ones once per process, before any CUDA work); what was set."""
    global _cuda_set
    import torch

    chosen = settings(device_type, cpu_threads)
    if device_type == "cuda" and not _cuda_set:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", chosen["cublas_workspace_config"])
        torch.backends.cudnn.benchmark = chosen["cudnn_benchmark"]
        torch.backends.cudnn.deterministic = chosen["cudnn_deterministic"]
        torch.backends.cuda.matmul.allow_tf32 = chosen["matmul_allow_tf32"]
        torch.backends.cudnn.allow_tf32 = chosen["cudnn_allow_tf32"]
        torch.use_deterministic_algorithms(True, warn_only=True)
        _cuda_set = True
    elif device_type == "cpu":
        torch.set_num_threads(cpu_threads)  # per process (and per thread under OpenMP): cheap, set every time
    return chosen
