"""The numerical guard: a NaN or all-black image or clip never counts as a result.

fp16 pipelines (SD 2.1-v in particular) can overflow in attention or in the
VAE and return NaN, which turns into a black picture. A degenerate output is
retried once with every pipeline module upcast to float32 (upcast attention
and an fp32 VAE); if that fails too the call raises `NumericalError` and the
task fails with that reason.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, TypeVar

import numpy as np
import torch

log = logging.getLogger("cosed")
T = TypeVar("T")


class NumericalError(RuntimeError):
    """A pipeline returned NaN/inf or all-black output even after the float32 retry."""


def degenerate(outputs: np.ndarray) -> str | None:
    """Why a float output in [0, 1] (images or frames, leading batch axis) is unusable, or None."""
    values = np.asarray(outputs)
    if not np.isfinite(values).all():
        return "NaN or inf values"
    flat = values.reshape(len(values), -1) if values.ndim > 1 else values[None]
    if (np.clip(flat, 0.0, 1.0).max(axis=1) * 255.0 < 0.5).any():
        return "an all-black output"
    return None


@contextmanager
def upcast(pipe):
    """Every torch module of the pipeline in float32 for the duration, then back."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    dtypes = [next(m.parameters()).dtype if any(True for _ in m.parameters()) else None for m in modules]
    for module in modules:
        module.to(dtype=torch.float32)
    try:
        yield
    finally:
        for module, dtype in zip(modules, dtypes):
            if dtype is not None:
                module.to(dtype=dtype)


def guarded(pipe, what: str, call: Callable[[], T], outputs: Callable[[T], np.ndarray]) -> T:
    """Run ``call``; on degenerate outputs retry once in float32; raise when the retry is degenerate too."""
    result = call()
    reason = degenerate(outputs(result))
    if reason is None:
        return result
    log.warning("%s gave %s; retrying once with the pipeline in float32", what, reason)
    with upcast(pipe):
        result = call()
    reason = degenerate(outputs(result))
    if reason is not None:
        raise NumericalError(f"{what} gave {reason} even with the pipeline in float32 "
                             "(upcast attention, fp32 VAE); no output was kept")
    return result
