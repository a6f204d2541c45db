"""One place that decides, per call, which implementation of an op runs — and says why.

Backends:

``triton``     Triton kernels. Default on CUDA tensors. On CPU tensors only when
               forced and the kernels were decorated under ``TRITON_INTERPRET=1``
               (the interpreter proves them correct; it is not fast).
``torch``      composed torch ops (``conv2d``/``conv_transpose2d``, strip-wise
               ``unfold`` + ``einsum``); runs on any device.
``cpp``        the C++ extension (``csrc/``), CPU tensors, float32/float64.
``reference``  the float64 oracle; only when forced, never a production path.

``PODIFF_BACKEND=reference|torch|cpp|triton`` forces one backend for every op
(an error if it cannot run the call); ``PODIFF_BACKEND=cpu`` means "the CPU fast
path", i.e. the best of ``torch``/``cpp`` as measured for that op and case.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _extension
from ._triton import HAS_TRITON, IMPORT_ERROR, INTERPRETED, capturing

BACKENDS = ("triton", "cpp", "torch", "reference")
_ALIASES = {"cpu": ("cpp", "torch")}


@dataclass
class Choice:
    """The backend picked for one call, why, and why each other one was passed over."""

    backend: str
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass
class _OpEntry:
    impls: dict[str, Callable] = field(default_factory=dict)
    # CPU preference per case (e.g. "shared"/"local"): ordered backends and the measurement behind it.
    cpu_order: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    # The same on CUDA devices; unset cases run Triton, then composed torch ops.
    gpu_order: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    cpp_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    cpp_devices: tuple[str, ...] = ("cpu",)  # "cuda" where the extension has a CUDA kernel for the op


_REGISTRY: dict[str, _OpEntry] = {}
#: The choice made by the latest call of each op (tests use it to prove which kernel ran).
last_choice: dict[str, Choice] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Registers ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    _REGISTRY.setdefault(op, _OpEntry()).impls[backend] = fn


def set_cpu_order(op: str, case: str, order: tuple[str, ...], why: str) -> None:
    """The CPU fast-path preference for ``op`` in ``case``, with the measurement that justifies it."""
    _REGISTRY.setdefault(op, _OpEntry()).cpu_order[case] = (tuple(order), why)


def set_gpu_order(op: str, case: str, order: tuple[str, ...], why: str) -> None:
    """The CUDA preference for ``op`` in ``case`` and the reason (measured, or why unmeasured)."""
    _REGISTRY.setdefault(op, _OpEntry()).gpu_order[case] = (tuple(order), why)


def set_cpp_devices(op: str, devices: tuple[str, ...]) -> None:
    """Device types the extension implements ``op`` for (default: CPU only)."""
    _REGISTRY.setdefault(op, _OpEntry()).cpp_devices = tuple(devices)


def forced() -> str | None:
    value = os.environ.get("PODIFF_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS and value not in _ALIASES:
        raise ValueError(
            f"PODIFF_BACKEND must be one of {BACKENDS + tuple(_ALIASES)} or unset; got {value!r}"
        )
    return value


def _unusable(backend: str, entry: _OpEntry, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run this call, or None if it can."""
    if backend not in entry.impls:
        return "not implemented for this op"
    if backend == "triton":
        if not HAS_TRITON:
            return f"triton does not import ({IMPORT_ERROR})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and (INTERPRETED or capturing()):
            return None  # the interpreter runs it; a capture only records the launch
        return "needs CUDA tensors (or TRITON_INTERPRET=1 set before import, for CPU tensors)"
    if backend == "cpp":
        if device.type not in entry.cpp_devices:
            return f"{'/'.join(entry.cpp_devices)} tensors only; got {device.type}"
        if dtype not in entry.cpp_dtypes:
            return f"float32/float64 only; got {dtype}"
        ok, why = _extension.status()
        return None if ok else why
    return None


def select(op: str, device: torch.device | str, dtype: torch.dtype, case: str = "default") -> Choice:
    """Chooses the backend for ``op`` on ``device``/``dtype`` in ``case`` (e.g. "shared"/"local")."""
    device = torch.device(device)
    entry = _REGISTRY[op]
    force = forced()
    rejected: dict[str, str] = {}
    if force in BACKENDS:
        why = _unusable(force, entry, device, dtype)
        if why is not None:
            raise RuntimeError(f"PODIFF_BACKEND={force} cannot run {op} on {device} {dtype}: {why}")
        return Choice(force, f"forced by PODIFF_BACKEND={force}")
    if device.type == "cpu":
        order, measured = entry.cpu_order.get(case, (("cpp", "torch"), "default order"))
        if force is None and INTERPRETED:
            rejected["triton"] = ("interpreter mode is for checking kernels, not speed (force with "
                                  "PODIFF_BACKEND=triton)")
        elif force is None:
            rejected["triton"] = _unusable("triton", entry, device, dtype) or "not chosen"
    else:
        order, measured = entry.gpu_order.get(
            case, (("triton", "torch"), "Triton kernels on GPU; composed torch ops otherwise")
        )
        if force is not None:  # "cpu" alias on a non-CPU tensor
            raise RuntimeError(f"PODIFF_BACKEND={force} needs CPU tensors; {op} got {device}")
    rejected["reference"] = "float64 oracle for tests; never a production path"
    for backend in order:
        why = _unusable(backend, entry, device, dtype)
        if why is None:
            return Choice(backend, measured, rejected)
        rejected[backend] = why
    raise RuntimeError(f"no backend can run {op} on {device} {dtype}: {rejected}")


def call(op: str, device, dtype, case: str, *args, **kwargs):
    """Runs ``op`` on the selected backend; if the C++ extension fails to build, falls back once."""
    choice = select(op, device, dtype, case)
    last_choice[op] = choice
    try:
        return _REGISTRY[op].impls[choice.backend](*args, **kwargs)
    except _extension.ExtensionError as exc:
        if forced() == "cpp":
            raise
        warnings.warn(f"{exc}; using the torch path for {op}", RuntimeWarning, stacklevel=2)
        last_choice[op] = Choice("torch", f"fallback: {exc}", {"cpp": str(exc)})
        return _REGISTRY[op].impls["torch"](*args, **kwargs)


def backends() -> dict:
    """Which implementation each op uses here, per device and case, and why the others were not used.

    Returns ``{op: {"cpu/<case>": {"backend", "reason", "rejected"}, "cuda/<case>": ...}}``.
    Nothing is built or launched.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict = {}
    for op, entry in sorted(_REGISTRY.items()):
        report[op] = {}
        for dev in devices:
            cases = (entry.cpu_order if dev == "cpu" else entry.gpu_order) or {"default": None}
            for case in cases:
                key = f"{dev}/{case}"
                try:
                    c = select(op, dev, torch.float32, case)
                    report[op][key] = {"backend": c.backend, "reason": c.reason, "rejected": c.rejected}
                except RuntimeError as exc:
                    report[op][key] = {"backend": None, "reason": str(exc), "rejected": {}}
    return report
