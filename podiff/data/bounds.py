"""Physical bounds of a field: blocks whose low-resolution value sits at a bound are known exactly.

Many fields have a hard bound: MRI intensity and precipitation are ``>= 0``, a sea-ice fraction
lies in ``[0, 1]``. When the low-resolution field is the block mean of the high-resolution one
(``data.block_average``: podiff makes it so when a file holds only the high-resolution field),
a block whose mean equals a bound can only be made of pixels at that bound. Those pixels are
certain: their mean is the bound, their variance 0, every member takes the bound. That is what
``apply`` does; every other pixel is left as predicted, so the mean and variance stay closed
form. On the MRI demo more than half of the test slices' pixels lie in such blocks (the empty
space around the head), where a regression or an ensemble mean would otherwise put small
ripples that the structural similarity punishes.

``bounds`` is ``(lo, hi)``, either None for no bound. Shapes: ``lr [N, C, h, w]``, high-resolution
fields ``[N, C, h·scale, w·scale]``, members ``[M, N, C, H, W]``.

>>> import torch
>>> from podiff.data.bounds import apply, certain_pixels
>>> from podiff.data.datasets import block_average
>>> hr = torch.tensor([[[[0., 0, 2, 4], [0, 0, 2, 0]]]])            # [1, 1, 2, 4], >= 0
>>> lr = block_average(hr, 2)                                       # [1, 1, 1, 2]: 0 and 2
>>> certain_pixels(lr, (0.0, None), 2).int()
tensor([[[[1, 1, 0, 0],
          [1, 1, 0, 0]]]], dtype=torch.int32)
>>> apply(torch.full_like(hr, 0.5), lr, (0.0, None), 2)[0]
tensor([[[[0.0000, 0.0000, 0.5000, 0.5000],
          [0.0000, 0.0000, 0.5000, 0.5000]]]])
"""

from __future__ import annotations

import math

import torch

from podiff.data.datasets import block_average

#: Relative tolerance of "the block mean equals the bound": float32 block means of values at the
#: bound round to within a few ulps of it.
RELATIVE_TOLERANCE = 1e-6


def check_bounds(bounds) -> tuple[float | None, float | None] | None:
    """``bounds`` as ``(lo, hi)`` floats (either None), or None for no bounds; a ValueError
    naming what is wrong otherwise."""
    if bounds is None:
        return None
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) != 2:
        raise ValueError(f"bounds must be None or (lo, hi), each a number or None; got {bounds!r}")
    lo, hi = (None if b is None else float(b) for b in bounds)
    for name, value in (("lo", lo), ("hi", hi)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"bounds' {name} must be finite or None; got {value}")
    if lo is None and hi is None:
        return None
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"bounds must have lo < hi; got lo={lo}, hi={hi}")
    return lo, hi


def _at(lr: torch.Tensor, bound: float) -> torch.Tensor:
    """Where ``lr`` sits at ``bound``, to ``RELATIVE_TOLERANCE`` of the larger of ``|bound|`` and
    the largest ``|lr|`` (tensor ops only: no device-to-host copy, so it runs as placed)."""
    size = torch.nan_to_num(lr.detach(), nan=0.0, posinf=0.0, neginf=0.0).abs().amax()
    return (lr - bound).abs() <= RELATIVE_TOLERANCE * torch.clamp(size, min=abs(bound))


def _bound_value(lr: torch.Tensor, bounds, scale: int) -> torch.Tensor:
    """``[N, C, h·scale, w·scale]``: the bound each pixel's block mean ``lr`` sits at, NaN where it
    sits at none (the certain pixels are where it is not NaN)."""
    bounds = check_bounds(bounds)
    if lr.dim() != 4:
        raise ValueError(f"lr must be [N, C, h, w]; got shape {tuple(lr.shape)}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer; got {scale!r}")
    value = torch.full_like(lr, float("nan"))
    for bound in bounds or ():
        if bound is not None:
            value = torch.where(_at(lr, bound), torch.full_like(lr, bound), value)
    return value.repeat_interleave(int(scale), -2).repeat_interleave(int(scale), -1)


def certain_pixels(lr: torch.Tensor, bounds, scale: int) -> torch.Tensor:
    """Bool ``[N, C, h·scale, w·scale]``: True where the pixel's block mean ``lr`` sits at a bound
    (to ``RELATIVE_TOLERANCE`` of the larger of the bound and the largest ``|lr|``)."""
    return ~torch.isnan(_bound_value(lr, bounds, scale))


def apply(mean: torch.Tensor, lr: torch.Tensor, bounds, scale: int, variance: torch.Tensor | None = None,
          members: torch.Tensor | None = None):
    """Sets the certain pixels (``certain_pixels``) to their bound: ``mean [N, C, H, W]`` (and the
    ``members [M, N, C, H, W]``) take the bound there and ``variance`` 0. Returns ``(mean,
    variance, members)`` (new tensors; None stays None); masked (NaN) pixels stay NaN."""
    if check_bounds(bounds) is None:
        return mean, variance, members
    expected = (lr.shape[0], lr.shape[1], lr.shape[2] * int(scale), lr.shape[3] * int(scale)) if lr.dim() == 4 else None
    if expected is None or tuple(mean.shape) != expected:
        raise ValueError(f"mean must be [N, C, h·scale, w·scale] = {expected} for lr {tuple(lr.shape)} and "
                         f"scale {scale}; got {tuple(mean.shape)}")
    value = _bound_value(lr.to(mean.device, torch.float64), bounds, scale)
    certain = ~torch.isnan(value) & ~torch.isnan(mean)
    mean = torch.where(certain, value.to(mean.dtype), mean)
    if variance is not None:
        variance = torch.where(certain, torch.zeros_like(variance), variance)
    if members is not None:
        if tuple(members.shape[1:]) != expected:
            raise ValueError(f"members must be [M, {', '.join(map(str, expected))}]; got {tuple(members.shape)}")
        members = torch.where(certain, value.to(members.dtype), members)
    return mean, variance, members


def check_pairs(lr: torch.Tensor, hr: torch.Tensor, bounds, scale: int) -> None:
    """Raises a ValueError unless ``hr`` lies within ``bounds`` and ``lr`` is its block mean (the
    two conditions under which ``apply`` is exact); NaN pixels are ignored."""
    lo, hi = check_bounds(bounds) or (None, None)
    values = hr[~torch.isnan(hr)]
    if lo is not None and values.numel() and float(values.min()) < lo:
        raise ValueError(f"bounds: hr must be >= the lower bound {lo}; its minimum is {float(values.min()):.6g}")
    if hi is not None and values.numel() and float(values.max()) > hi:
        raise ValueError(f"bounds: hr must be <= the upper bound {hi}; its maximum is {float(values.max()):.6g}")
    means = block_average(hr.double(), int(scale))
    both = ~torch.isnan(means) & ~torch.isnan(lr)
    gap = float((means - lr.double())[both].abs().max()) if bool(both.any()) else 0.0
    finite = lr[torch.isfinite(lr)]
    size = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-30)
    if gap > 1e-4 * size:
        raise ValueError(f"bounds need lr to be the block mean of hr (scale {scale}); they differ by up to "
                         f"{gap:.3g} (largest |lr| {size:.3g}). Drop the bounds, or make lr by block averaging")


__all__ = ["RELATIVE_TOLERANCE", "apply", "certain_pixels", "check_bounds", "check_pairs"]
