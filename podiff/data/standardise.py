"""Per-channel data scaling: the offset and scale that standardise the fields before the POD.

Two passes of float64 sums over the valid pixels, reduced over ranks in a distributed run, so
every rank (and one process) gets the same offset and scale.
"""

from __future__ import annotations

import torch

from podiff.core import distributed as distributed_


def fit_scaling(hr: torch.Tensor, valid: torch.Tensor, distributed: bool = False):
    """``(offset [C], scale [C])`` float32 on ``hr``'s device: mean and standard deviation of the
    valid pixels of ``hr [N, C, H, W]`` per channel (``valid``: bool, same shape)."""
    reduce = distributed_.all_sum if distributed else (lambda v: v)
    offsets, scales = [], []
    for c in range(hr.shape[1]):
        values = hr[:, c][valid[:, c]].double()
        count = reduce(torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device))
        if count < 2:
            raise ValueError(f"hr channel {c} has fewer than two valid pixels")
        mean = reduce(values.sum()) / count
        var = reduce((values - mean).pow(2).sum()) / (count - 1)
        offsets.append(mean)
        scales.append(var.sqrt().clamp_min(1e-12))
    return torch.stack(offsets).float(), torch.stack(scales).float()


def standardise(x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x − offset) / scale`` per channel of ``x [N, C, H, W]``."""
    return (x - offset.view(1, -1, 1, 1).to(x)) / scale.view(1, -1, 1, 1).to(x)


def unstandardise(x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x · scale + offset`` per channel (the inverse of ``standardise``)."""
    return x * scale.view(1, -1, 1, 1).to(x) + offset.view(1, -1, 1, 1).to(x)


__all__ = ["fit_scaling", "standardise", "unstandardise"]
