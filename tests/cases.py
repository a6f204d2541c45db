"""Deliberately odd patch-op cases shared by the op tests (small: the Triton interpreter is slow)."""

from __future__ import annotations

import torch
from utils import orthonormal

# (B, C, H, W, p, s): prime sizes that the stride covers, C in {1, 3}, overlap and none.
SHAPES = [
    (2, 1, 13, 11, 3, 2),  # prime H, W; overlap
    (2, 3, 13, 7, 4, 3),  # prime H, W; C = 3; overlap
    (3, 1, 17, 13, 5, 2),  # odd patch; up to 3x3 covering patches per pixel
    (2, 3, 12, 9, 3, 3),  # no overlap (s = p); C = 3
    (1, 1, 10, 10, 5, 5),  # no overlap, single image
]
SHAPE_IDS = [f"B{b}C{c}_{h}x{w}_p{p}s{s}" for b, c, h, w, p, s in SHAPES]

#: Set by conftest from ``--full``: the fast run gives the Triton interpreter smaller images.
FULL = False


def interpreter_shape(shape, images: int | None = None):
    """The shape a Triton-interpreter case runs on: at most ``images`` images (fast run: at most
    two when None; ``--full``: all of them when None), and in the fast run
    the smallest grid that keeps every pixel's full cover: with ``k = ⌈p/s⌉`` patches covering a
    pixel along an axis, ``p + max(k, 2)·s`` rows and ``p + max(k − 1, 1)·s`` columns (so rows
    and columns still differ, and a no-overlap case keeps two patches a side). ``--full`` keeps
    the size."""
    B, C, H, W, p, s = shape
    if FULL:
        return (B if images is None else min(B, images), C, H, W, p, s)
    B = min(B, images or 2)
    k = -(-p // s)
    return (B, C, min(H, p + max(k, 2) * s), min(W, p + max(k - 1, 1) * s), p, s)


def make_case(shape, local: bool, mean_kind: str, r: int = 5, dtype=torch.float64, seed: int = 0):
    """x, basis, mean, coeffs for one case; mean_kind in {"none", "shared", "local"}."""
    B, C, H, W, p, s = shape
    nH, nW = (H - p) // s + 1, (W - p) // s + 1
    L, D = nH * nW, C * p * p
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    basis = orthonormal(D, min(r, D), *((L,) if local else ()), seed=seed + 1)
    mean = {"none": None, "shared": torch.randn(D, generator=g, dtype=torch.float64),
            "local": torch.randn(L, D, generator=g, dtype=torch.float64)}[mean_kind]
    coeffs = torch.randn(B, L, basis.shape[-1], generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(basis), cast(mean), cast(coeffs)
