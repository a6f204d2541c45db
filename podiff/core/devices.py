"""Choosing the device: ``auto`` (CUDA when torch has it), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch

CHOICES = "auto | cpu | cuda | cuda:N"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for ``spec``; a clear one-line error when it cannot be had here.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec.strip().lower() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be {CHOICES}; got {spec!r}") from None
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device must be {CHOICES}; got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = ("a CPU-only build" if torch.version.cuda is None
                     else f"CUDA {torch.version.cuda}, but no GPU is visible")
            raise ValueError(f"device {spec!r} asked for, but torch {torch.__version__} here is {build}; "
                             f"use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec!r} asked for, but only {count} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{count - 1})")
    return device


__all__ = ["resolve_device", "CHOICES"]
