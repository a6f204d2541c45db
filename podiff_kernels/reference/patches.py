"""Reference patch encode / decode / correlate: ``F.unfold``/``F.fold`` and einsum.

Written for clarity, not speed: the patch matrix ``[B, L, D]`` is materialised.
Shapes: x ``[B, C, H, W]``; basis ``[D, r]`` (shared) or ``[L, D, r]`` (local);
mean ``[D]`` or ``[L, D]``; coeffs ``[B, L, r]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def extract_patches(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, L, D]``, patches in row-major order, ``(c, ky, kx)`` inside."""
    return F.unfold(x, patch_size, stride=stride).transpose(1, 2)


def _basis_per_location(basis: torch.Tensor, L: int) -> torch.Tensor:
    return basis.expand(L, *basis.shape) if basis.dim() == 2 else basis


def patch_encode(x, basis, mean, patch_size, stride=None):
    """``a_l = Φ_lᵀ (x_l − μ_l)`` for every image and location: ``[B, L, r]``."""
    stride = patch_size if stride is None else stride
    patches = extract_patches(x, patch_size, stride)  # B, L, D
    if mean is not None:
        patches = patches - mean
    return torch.einsum("bld,ldr->blr", patches, _basis_per_location(basis, patches.shape[1]))


def patch_decode(coeffs, basis, mean, image_size, patch_size, stride=None, average=True):
    """``Σ_l R_lᵀ (μ_l + Φ_l a_l)``: each pixel the mean of the reconstructions of the patches
    covering it (divided by the cover count ``n_j``), or their sum when not ``average``."""
    stride = patch_size if stride is None else stride
    B, L, _ = coeffs.shape
    cols = torch.einsum("ldr,blr->bld", _basis_per_location(basis, L), coeffs)
    if mean is not None:
        cols = cols + mean
    out = F.fold(cols.transpose(1, 2), tuple(image_size), patch_size, stride=stride)
    if average:
        ones = torch.ones_like(cols[:1, :, :1]).expand(1, L, cols.shape[2])
        out = out / F.fold(ones.transpose(1, 2), tuple(image_size), patch_size, stride=stride)
    return out


def patch_correlate(x, grad, patch_size, stride=None, local=False):
    """``Σ_b Σ_l x_{b,l} g_{b,l}ᵀ`` (``[D, r]``), or per location without the l-sum (``[L, D, r]``)."""
    stride = patch_size if stride is None else stride
    patches = extract_patches(x, patch_size, stride)
    return torch.einsum("bld,blr->ldr" if local else "bld,blr->dr", patches, grad)


def patch_encode_masked(x, mask, basis, mean, patch_size, stride=None, gap_weight=1e-3):
    """Gappy POD (Everson & Sirovich 1995): per patch, the weighted least-squares coefficients
    ``c = (Φᵀ W Φ)⁻¹ Φᵀ V (x − μ)`` with ``V`` the valid pixels and ``W = V + gap_weight·(I − V)``
    (masked pixels pulled towards the mean with weight ``gap_weight``): ``[B, L, r]``."""
    stride = patch_size if stride is None else stride
    valid = extract_patches(mask.expand(x.shape[0], *mask.shape[1:]).to(x.dtype), patch_size, stride)  # B, L, D
    patches = extract_patches(torch.where(mask, x, 0.0), patch_size, stride)
    centred = patches - mean if mean is not None else patches
    centred = torch.where(valid > 0, centred, 0.0)
    weight = valid + gap_weight * (1 - valid)
    phi = _basis_per_location(basis, patches.shape[1])  # L, D, r
    gram = torch.einsum("bld,ldr,lds->blrs", weight, phi, phi)
    rhs = torch.einsum("bld,ldr->blr", centred, phi)
    return torch.linalg.solve_ex(gram, rhs.unsqueeze(-1))[0].squeeze(-1)
