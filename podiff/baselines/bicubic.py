"""Bicubic upsampling as a baseline (masked pixels filled first, NaN again after).

>>> import torch
>>> bicubic(torch.ones(1, 1, 2, 2), 3).shape
torch.Size([1, 1, 6, 6])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from podiff.baselines.base import BaselineEntry, Deterministic
from podiff.data.resample import upsample


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, C, h, w] -> [N, C, h·scale, w·scale]``; NaN where the nearest LR pixel is NaN."""
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    up = upsample(lr, size)
    masked = F.interpolate(torch.isnan(lr).float(), size=size, mode="nearest") > 0
    return up.masked_fill(masked, float("nan"))


class BicubicBaseline(Deterministic):
    """Bicubic upsampling as a model (``fit`` does nothing); of the input's first ``channels``
    channels (None: all; the rest are covariates it cannot use)."""

    def __init__(self, scale: int, channels: int | None = None):
        self.scale = int(scale)
        self.channels = channels

    def fit(self, lr=None, hr=None, **_) -> BicubicBaseline:
        return self

    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        return bicubic(lr if self.channels is None else lr[:, : self.channels], self.scale)


ENTRY = BaselineEntry("bicubic", make=lambda pipe: BicubicBaseline(pipe.config.scale, pipe.offset.numel()))

__all__ = ["BicubicBaseline", "ENTRY", "bicubic"]
