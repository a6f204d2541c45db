"""Optional Triton import. Kernels are defined only when Triton imports.

``triton.jit`` picks the interpreter at *decoration* time, so whether Triton
kernels can run on CPU tensors is fixed when this module is first imported:
``TRITON_INTERPRET=1`` must be set before ``import podiff_kernels``.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl

    HAS_TRITON = True
    IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or a broken install
    triton = None
    tl = None
    HAS_TRITON = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: True when the kernels below were decorated in interpreter mode (they then run on CPU tensors).
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block(n: int, lo: int = 16, hi: int = 64) -> int:
    """A power-of-two block size covering ``n`` clamped to ``[lo, hi]`` (``tl.dot`` needs >= 16)."""
    return max(lo, min(hi, next_pow2(n)))


def acc_dtype(dtype):
    """Accumulator for a Triton kernel: float64 stays float64, everything else float32."""
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32


def mean_strides(mean) -> tuple[int, int]:
    """(location stride, d stride) of a patch mean ``[D]`` (location stride 0), ``[L, D]`` or ``None``."""
    if mean is None:
        return 0, 0
    return (0, mean.stride(0)) if mean.dim() == 1 else (mean.stride(0), mean.stride(1))


# ----------------------------------------------------------------------------------------------
# Launching, and capturing what would be launched
#
# Every launcher goes through ``launch``. Inside ``capture_launches()`` nothing runs: each call
# is recorded with its real arguments (tensors, ints, constexprs, num_warps), so a checker can
# compile exactly the configurations the launchers pick, on a machine without a GPU
# (``podiff_kernels.compile_check``).
# ----------------------------------------------------------------------------------------------
import contextlib  # noqa: E402
import contextvars  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402


@dataclass
class Launch:
    """One kernel launch as a launcher would make it."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


_CAPTURED: contextvars.ContextVar[list | None] = contextvars.ContextVar("podiff_captured_launches", default=None)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or only a record of it inside ``capture_launches``."""
    captured = _CAPTURED.get()
    if captured is not None:
        captured.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def capturing() -> bool:
    """True inside ``capture_launches`` (dispatch then routes CPU tensors to the Triton launchers)."""
    return _CAPTURED.get() is not None


@contextlib.contextmanager
def capture_launches():
    """Records (and does not run) every launch made inside the block; yields the list of ``Launch``."""
    captured: list[Launch] = []
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)
