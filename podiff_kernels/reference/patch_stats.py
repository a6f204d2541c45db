"""Reference patch statistics: the patch matrix materialised, pairwise-complete moments, two passes.

For groups ``g`` (one group of all ``B·L`` patches, or one per location with its
``B`` patches) and patch pixels ``i, j``, with ``w`` the validity (1 valid, 0 masked):

    count[g, i, j] = Σ_s w_si w_sj
    mean[g, i, j]  = Σ_s w_si w_sj x_si / count[g, i, j]      (mean of x_i where i and j are valid)
    m2[g, i, j]    = Σ_s w_si w_sj (x_si − mean[g, i, j]) (x_sj − mean[g, j, i])

Without masked pixels every mean[g, i, :] is the plain pixel mean and m2 the
centred cross-product matrix of PCA. ``complete``: ``w_si`` is replaced by the patch's
``min_i w_si`` (only patches with every pixel valid count). Float64, small inputs only.
"""

from __future__ import annotations

import torch

from .patches import extract_patches


def patch_stats(x: torch.Tensor, valid: torch.Tensor | None, patch_size: int, stride: int, local: bool,
                complete: bool = False):
    """``x [B, C, H, W]``, ``valid`` bool like ``x`` or None -> ``(count, mean, m2)``, each ``[G, D, D]``."""
    x = x.double()
    w = torch.ones_like(x) if valid is None else valid.double()
    X = extract_patches(torch.where(w > 0, x, 0.0), patch_size, stride)  # B, L, D
    Wp = extract_patches(w, patch_size, stride)
    if complete:
        Wp = Wp.amin(-1, keepdim=True).expand_as(Wp)
    if local:
        X, Wp = X.transpose(0, 1), Wp.transpose(0, 1)  # L, B, D: samples are the images
    else:
        X, Wp = X.reshape(1, -1, X.shape[-1]), Wp.reshape(1, -1, Wp.shape[-1])
    both = Wp[:, :, :, None] * Wp[:, :, None, :]  # G, S, D, D
    count = both.sum(1)
    sums = (both * X[:, :, :, None]).sum(1)
    mean = torch.where(count > 0, sums / count.clamp_min(1), 0.0)
    dev_i = X[:, :, :, None] - mean[:, None, :, :]  # x_si − mean[i, j]
    dev_j = X[:, :, None, :] - mean.transpose(1, 2)[:, None, :, :]  # x_sj − mean[j, i]
    m2 = (both * dev_i * dev_j).sum(1)
    return count, mean, m2


def covariance(count: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Unbiased pairwise covariance ``m2 / (count − 1)``; zero where fewer than two samples."""
    return torch.where(count >= 2, m2 / (count - 1).clamp_min(1), 0.0)
