"""Resampling fields between grids with masked (NaN) pixels: ``upsample`` (bicubic).

>>> import torch
>>> lr = torch.tensor([[[[1.0, float("nan")], [3.0, 4.0]]]])
>>> upsample(lr, (4, 4)).shape
torch.Size([1, 1, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(lr: torch.Tensor, size) -> torch.Tensor:
    """Bicubic upsampling of ``lr [N, C, h, w]`` to ``size``; masked (NaN) pixels filled first with the
    image's valid mean so they do not spread (a caller masks them again where it needs to)."""
    valid = ~torch.isnan(lr)
    fill = torch.where(valid, lr, 0.0).sum((-2, -1), keepdim=True) / valid.sum((-2, -1), keepdim=True).clamp_min(1)
    filled = torch.where(valid, lr, fill)
    return F.interpolate(filled, size=tuple(size), mode="bicubic", align_corners=False)


__all__ = ["upsample"]
