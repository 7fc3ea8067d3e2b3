"""Which NVIDIA driver a CUDA build of torch needs: a table and pure decisions, no GPU required.

A torch wheel bundles its own CUDA runtime; what it needs from the host is a driver
new enough for that CUDA *major* version. NVIDIA's "CUDA Minor Version
Compatibility" table (docs.nvidia.com/deploy/cuda-compatibility/, Table 1) gives
the minimum driver branch per major version: an application built with any 13.x
toolkit runs on driver >= 580, any 12.x on >= 525, any 11.x on >= 450 (the note
there names 450.80.02 for Linux). Older drivers cannot load the runtime at all;
CUDA containers built on NVIDIA's images also refuse to start (their
``NVIDIA_REQUIRE_CUDA`` asks for the toolkit's own driver).
"""

from __future__ import annotations

from dataclasses import dataclass

# CUDA major version -> minimum Linux driver (NVIDIA, CUDA Minor Version Compatibility, Table 1).
MIN_DRIVER_FOR_CUDA_MAJOR: dict[int, str] = {
    13: "580",
    12: "525",
    11: "450.80.02",
}

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class DriverVerdict:
    """One line of `cosed doctor`: status, what was found, and the fix when it is not ok."""

    status: str
    detail: str
    fix: str = ""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"580.65.06"`` -> ``(580, 65, 6)``; non-numeric parts end the tuple."""
    parts = []
    for piece in version.strip().split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def min_driver(cuda: str) -> str | None:
    """The minimum driver for a CUDA version such as ``"13.0"`` (None when the table has no entry)."""
    major = version_tuple(cuda)[:1]
    return MIN_DRIVER_FOR_CUDA_MAJOR.get(major[0]) if major else None


def driver_at_least(driver: str, minimum: str) -> bool:
    """Compare dotted driver versions numerically (``"580.95.05" >= "580"``)."""
    return version_tuple(driver) >= version_tuple(minimum)


def driver_verdict(driver: str | None, torch_cuda: str | None, torch_version: str) -> DriverVerdict:
    """Does this host's driver run this torch build? ``driver`` from nvidia-smi (None: no driver),
    ``torch_cuda`` is ``torch.version.cuda`` (None: a CPU-only build)."""
    build = f"torch {torch_version} built for " + (f"CUDA {torch_cuda}" if torch_cuda else "CPU only")
    if driver is None:
        need = min_driver(torch_cuda) if torch_cuda else None
        return DriverVerdict(OK, f"no NVIDIA driver (nvidia-smi not found); {build}"
                             + (f" (a GPU node needs driver >= {need})" if need else ""))
    if torch_cuda is None:
        return DriverVerdict(WARN, f"NVIDIA driver {driver}, but {build}: models would run on the CPU",
                             "install torch's CUDA build (the cluster image does: cluster/Dockerfile)")
    need = min_driver(torch_cuda)
    if need is None:
        return DriverVerdict(WARN, f"NVIDIA driver {driver}; {build}: no known minimum driver for that CUDA",
                             "check NVIDIA's CUDA compatibility table for this CUDA version")
    if not driver_at_least(driver, need):
        return DriverVerdict(FAIL, f"NVIDIA driver {driver} is too old for {build} (needs >= {need})",
                             f"upgrade the host driver to >= {need} (cluster/README.md: GPU image and driver), "
                             "or install a torch built for an older CUDA")
    return DriverVerdict(OK, f"NVIDIA driver {driver}; {build} (needs >= {need})")
