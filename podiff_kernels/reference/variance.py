"""Reference pixel-variance propagation and ensemble moments (float64 oracles).

Patches are treated as independent. For pixel ``j`` covered by ``n_j`` patches:

- block:    ``Var(x̂_j) = (1/n_j²) Σ_{l∋j} φ_{l,j}ᵀ Σ_l φ_{l,j}``
- diagonal: ``Var(x̂_j) = (1/n_j²) Σ_{l∋j} Σ_k Φ²_{l,jk} σ²_{l,k}``

where ``φ_{l,j}`` is the row of ``Φ_l`` for pixel ``j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_location(basis: torch.Tensor, L: int) -> torch.Tensor:
    return basis.expand(L, *basis.shape) if basis.dim() == 2 else basis


def _fold_normalised(per_patch: torch.Tensor, image_size, patch_size: int, stride: int) -> torch.Tensor:
    """``(1/n_j²) Σ_{l∋j} v_{l, d(j)}`` from per-patch pixel values ``[B, L, D]``."""
    out = F.fold(per_patch.transpose(1, 2), tuple(image_size), patch_size, stride=stride)
    ones = torch.ones_like(per_patch[:1]).transpose(1, 2)
    n = F.fold(ones, tuple(image_size), patch_size, stride=stride)
    return out / n**2


def propagate_variance(var_or_cov, basis, image_size, patch_size, stride=None):
    """Pixel variance ``[B, C, H, W]`` from ``[B, L, r]`` mode variances or ``[B, L, r, r]`` covariances."""
    stride = patch_size if stride is None else stride
    phi = _per_location(basis, var_or_cov.shape[1])  # [L, D, r]
    if var_or_cov.dim() == 3:
        per_patch = torch.einsum("ldk,blk->bld", phi**2, var_or_cov)
    else:
        per_patch = torch.einsum("ldk,blkm,ldm->bld", phi, var_or_cov, phi)
    return _fold_normalised(per_patch, image_size, patch_size, stride)


def ensemble_moments(samples, diagonal=False):
    """Mean ``[B, L, r]`` and unbiased covariance ``[B, L, r, r]`` (or variance ``[B, L, r]``) over ``M``."""
    mean = samples.mean(0)
    centered = samples - mean
    M = samples.shape[0]
    if diagonal:
        return mean, (centered**2).sum(0) / (M - 1)
    return mean, torch.einsum("mblk,mblj->blkj", centered, centered) / (M - 1)


def dense_decoder(basis, image_size, patch_size, stride=None, channels=None):
    """The decoder as an explicit matrix ``[C·H·W, L·r]`` (small shapes only): x̂ = A a + const."""
    stride = patch_size if stride is None else stride
    H, W = image_size
    D = basis.shape[-2]
    C = channels or D // (patch_size * patch_size)
    nH, nW = (H - patch_size) // stride + 1, (W - patch_size) // stride + 1
    L, r = nH * nW, basis.shape[-1]
    phi = _per_location(basis, L)
    eye = torch.eye(L * r, dtype=basis.dtype).reshape(L * r, L, r)  # every unit coefficient vector
    cols = torch.einsum("ldk,nlk->nld", phi, eye)
    out = F.fold(cols.transpose(1, 2), (H, W), patch_size, stride=stride)
    ones = torch.ones(1, D, L, dtype=basis.dtype)
    out = out / F.fold(ones, (H, W), patch_size, stride=stride)
    return out.reshape(L * r, C * H * W).t()
