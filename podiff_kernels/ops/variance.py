"""Analytic pixel uncertainty: ``propagate_variance`` and the fused ``decode_moments``.

Patches are treated as independent; for pixel ``j`` covered by ``n_j`` patches

    block:    Var(x̂_j) = (1/n_j²) Σ_{l∋j} φ_{l,j}ᵀ Σ_l φ_{l,j}
    diagonal: Var(x̂_j) = (1/n_j²) Σ_{l∋j} Σ_k Φ²_{l,jk} σ²_{l,k}

The Triton kernel is output-centric on stride-aligned cells: all pixels of one
``C×s×s`` cell are covered by the same patches, so a program loads each covering
patch's ``Σ_l`` once and forms ``rowsum((φ Σ) ∘ φ)`` for the whole cell in on-chip
memory (``tl.dot``); ``ΦΣ`` and per-patch ``D×D`` matrices never reach global memory.
The same pass can also produce the pixel mean (``decode_moments``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._geometry import (
    PatchGrid,
    check_basis,
    check_float_tensors,
    check_mean,
    cover_counts,
    grid_from_basis,
    location_row_chunks,
    resolve_stride,
)
from .._triton import HAS_TRITON, acc_dtype, block, launch, mean_strides, tl, triton
from ..reference import patches as ref_patches
from ..reference import variance as reference
from .patch_decode import patch_decode_op

MODE_NONE, MODE_DIAGONAL, MODE_BLOCK = 0, 1, 2

if HAS_TRITON:

    @triton.jit
    def _decode_moments_kernel(
        m_ptr, mu_ptr, v_ptr, basis_ptr, mean_out_ptr, var_out_ptr,
        C, H, W, nH, nW, NCY, NCX, R,
        smb, sml, smr,
        sul, sud,
        svb, svl, svk, svm,
        sbl, sbd, sbr,
        sob, soc, soh, sow,
        P: tl.constexpr, S: tl.constexpr, NCOVER: tl.constexpr, MODE: tl.constexpr,
        WITH_MEAN: tl.constexpr, HAS_MU: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        CELL: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = (pid // (NCY * NCX)).to(tl.int64)
        cy = (pid // NCX) % NCY
        cx = pid % NCX
        q = tl.program_id(1) * CELL + tl.arange(0, CELL)  # pixel of the cell, (c, yy, xx) order
        ch = q // (S * S)
        y = cy * S + (q // S) % S
        x = cx * S + q % S
        valid = (ch < C) & (y < H) & (x < W)
        acc_m = tl.zeros([CELL], dtype=ACC)
        acc_v = tl.zeros([CELL], dtype=ACC)
        for iy in tl.static_range(NCOVER):
            for ix in tl.static_range(NCOVER):
                # Covering patch (cy - iy, cx - ix): as a per-pixel vector for the masks (the
                # interpreter mishandles scalar & vector masks), clamped scalar for the loads.
                oy = y // S - iy
                ox = x // S - ix
                ky = y - oy * S
                kx = x - ox * S
                ok = valid & (oy >= 0) & (oy < nH) & (ox >= 0) & (ox < nW) & (ky < P) & (kx < P)
                loc = (tl.minimum(tl.maximum(cy - iy, 0), nH - 1) * nW
                     + tl.minimum(tl.maximum(cx - ix, 0), nW - 1)).to(tl.int64)
                d = (ch * P + ky) * P + kx
                phi_row = basis_ptr + loc * sbl + d[:, None] * sbd
                for k0 in range(0, R, BLOCK_R):
                    kk = k0 + tl.arange(0, BLOCK_R)
                    k_ok = kk < R
                    if MODE == 2:
                        # (φ Σ)[:, kk] for this column block first, with φ_k not yet loaded: the dot
                        # loop is the register peak (compile_check), then rowsum((φ Σ) ∘ φ) over it.
                        t = tl.zeros([CELL, BLOCK_R], dtype=ACC)
                        for j0 in range(0, R, BLOCK_R):
                            jj = j0 + tl.arange(0, BLOCK_R)
                            j_ok = jj < R
                            phj = tl.load(phi_row + jj[None, :] * sbr, mask=ok[:, None] & j_ok[None, :], other=0.0)
                            sig = tl.load(v_ptr + b * svb + loc * svl + jj[:, None] * svk + kk[None, :] * svm,
                                          mask=j_ok[:, None] & k_ok[None, :], other=0.0)
                            t += tl.dot(phj.to(ACC), sig.to(ACC), input_precision=PRECISION, out_dtype=ACC)
                    phi = tl.load(phi_row + kk[None, :] * sbr, mask=ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
                    if WITH_MEAN:
                        a = tl.load(m_ptr + b * smb + loc * sml + kk * smr, mask=k_ok, other=0.0).to(ACC)
                        acc_m += tl.sum(phi * a[None, :], axis=1)
                    if MODE == 1:
                        var = tl.load(v_ptr + b * svb + loc * svl + kk * svk, mask=k_ok, other=0.0).to(ACC)
                        acc_v += tl.sum(phi * phi * var[None, :], axis=1)
                    if MODE == 2:
                        acc_v += tl.sum(t * phi, axis=1)
                if WITH_MEAN and HAS_MU:
                    acc_m += tl.load(mu_ptr + loc * sul + d * sud, mask=ok, other=0.0).to(ACC)
        ny = tl.minimum(y // S, nH - 1) - tl.maximum(y - P + S, 0) // S + 1
        nx = tl.minimum(x // S, nW - 1) - tl.maximum(x - P + S, 0) // S + 1
        n = tl.where(valid, ny * nx, 1).to(ACC)
        out_off = b * sob + ch * soc + y * soh + x * sow
        if WITH_MEAN:
            tl.store(mean_out_ptr + out_off, (acc_m / n).to(mean_out_ptr.dtype.element_ty), mask=valid)
        if MODE != 0:
            var_px = tl.maximum(acc_v, 0.0) / (n * n)  # clamp round-off: a variance is never negative
            tl.store(var_out_ptr + out_off, var_px.to(var_out_ptr.dtype.element_ty), mask=valid)


def _moments_triton(mean_coeffs, var_or_cov, basis, mean, grid: PatchGrid):
    """(pixel mean or None, pixel variance or None) in one pass over the tokens."""
    ref = mean_coeffs if mean_coeffs is not None else var_or_cov
    B, R = ref.shape[0], basis.shape[-1]
    C, H, W, s = grid.channels, grid.height, grid.width, grid.stride
    mode = MODE_NONE if var_or_cov is None else (MODE_DIAGONAL if var_or_cov.dim() == 3 else MODE_BLOCK)
    out_m = torch.empty(B, C, H, W, device=ref.device, dtype=ref.dtype) if mean_coeffs is not None else None
    out_v = torch.empty(B, C, H, W, device=ref.device, dtype=ref.dtype) if mode else None
    out_any = out_m if out_m is not None else out_v
    ncy, ncx = triton.cdiv(H, s), triton.cdiv(W, s)
    sm = mean_coeffs.stride() if mean_coeffs is not None else (0, 0, 0)
    su = mean_strides(mean)
    sv = (0, 0, 0, 0) if var_or_cov is None else (tuple(var_or_cov.stride()) + (0,))[:4]
    sb = ((basis.stride(0),) if basis.dim() == 3 else (0,)) + tuple(basis.stride()[-2:])
    # A program takes a chunk of a C×s×s cell (wide cells are split over grid axis 1): 64 pixels,
    # and in block mode fewer where each pixel costs more registers: 32 with overlap (the covering
    # patches' loop is unrolled), 16 for odd patch sizes or half precision with overlap. Block mode:
    # φΣ is an FMA dot holding K = BLOCK_R values a thread per row beside the φ, φ_j and address
    # tiles; K = 16 at 8 warps (16 for float64 cells of 32+) is what spills on no architecture
    # (compile_check: K = 32 spilled at every cell size, as did 4 warps and 64-pixel chunks).
    overlap, half = grid.max_cover > 1, ref.element_size() == 2
    if mode != MODE_BLOCK:
        chunk = 64
    else:
        chunk = 16 if grid.odd_patch or (overlap and half) else 32 if overlap else 64
    cell = block(C * s * s, 16, chunk)
    block_r = 16 if mode == MODE_BLOCK else block(R, 16, 32)
    warps = (16 if ref.element_size() == 8 and cell >= 32 else 8) if mode == MODE_BLOCK else 4
    launch(_decode_moments_kernel, (B * ncy * ncx, triton.cdiv(C * s * s, cell)),
        ref if mean_coeffs is None else mean_coeffs, ref if mean is None else mean,
        ref if var_or_cov is None else var_or_cov, basis,
        out_any if out_m is None else out_m, out_any if out_v is None else out_v,
        C, H, W, grid.n_rows, grid.n_cols, ncy, ncx, R,
        *sm, *su, *sv, *sb, *out_any.stride(),
        P=grid.patch_size, S=s, NCOVER=grid.max_cover, MODE=mode, WITH_MEAN=mean_coeffs is not None,
        HAS_MU=mean is not None, ACC=acc_dtype(ref.dtype), PRECISION="ieee",
        CELL=cell, BLOCK_R=block_r, num_warps=warps,
    )
    return out_m, out_v


def _fold_patch_values(per_patch: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Sums per-patch pixel values ``[B, L, D]`` onto the image; without overlap a pure permutation."""
    B, C, p = per_patch.shape[0], grid.channels, grid.patch_size
    if grid.stride == p:
        tiles = per_patch.view(B, grid.n_rows, grid.n_cols, C, p, p)
        return tiles.permute(0, 3, 1, 4, 2, 5).reshape(B, C, grid.height, grid.width)
    return F.fold(per_patch.transpose(1, 2), (grid.height, grid.width), p, stride=grid.stride)


def _variance_torch(var_or_cov, basis, grid: PatchGrid):
    """Per-patch pixel variances by one GEMM, then a fold and ``1/n²``.

    Diagonal: ``σ² (Φ²)ᵀ``. Block: ``vec(Σ_l) (Φ⊙Φ)ᵀ`` with the row-wise Khatri–Rao basis
    ``(Φ⊙Φ)[d, (k, m)] = Φ_dk Φ_dm``, which is exact for any ``Σ_l`` (only its symmetric part
    enters ``φᵀΣφ``) and never forms ``ΦΣ``.
    """
    B, L, r = var_or_cov.shape[:3]
    if basis.dim() == 2:
        if var_or_cov.dim() == 3:
            per_patch = var_or_cov @ basis.square().t()
        else:
            khatri_rao = (basis[:, :, None] * basis[:, None, :]).reshape(basis.shape[0], r * r)  # [D, r²]
            per_patch = var_or_cov.reshape(B, L, r * r) @ khatri_rao.t()
        out = _fold_patch_values(per_patch, grid)
    else:  # local basis: a Khatri–Rao basis would be r times the basis; go strip by strip
        H, W, p, s = grid.height, grid.width, grid.patch_size, grid.stride
        out = var_or_cov.new_zeros(B, grid.channels, H, W)
        row_bytes = B * grid.n_cols * grid.patch_dim * r * var_or_cov.element_size()
        for r0, r1 in location_row_chunks(grid, row_bytes):
            l0, l1 = r0 * grid.n_cols, r1 * grid.n_cols
            phi, v = basis[l0:l1], var_or_cov[:, l0:l1]
            if v.dim() == 3:
                per_patch = torch.einsum("ldk,blk->bld", phi.square(), v)
            else:
                per_patch = ((phi @ v) * phi).sum(-1)  # rowsum((Φ Σ) ∘ Φ), one strip at a time: [B, l, D]
            y0, y1 = r0 * s, (r1 - 1) * s + p
            out[:, :, y0:y1] += F.fold(per_patch.transpose(1, 2), (y1 - y0, W), p, stride=s)
    if grid.stride != grid.patch_size:  # without overlap n_j = 1
        out *= cover_counts(grid, out.device, out.dtype).reciprocal().square()
    return out.clamp_(min=0)


def _moments_torch(mean_coeffs, var_or_cov, basis, mean, grid: PatchGrid):
    H, W, p, s = grid.height, grid.width, grid.patch_size, grid.stride
    pixel_mean = (None if mean_coeffs is None
                  else patch_decode_op(mean_coeffs.contiguous(), basis, mean, H, W, p, s, True))
    pixel_var = None if var_or_cov is None else _variance_torch(var_or_cov, basis, grid)
    return pixel_mean, pixel_var


def _moments_reference(mean_coeffs, var_or_cov, basis, mean, grid: PatchGrid):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    size, p, s = (grid.height, grid.width), grid.patch_size, grid.stride
    dt = (mean_coeffs if mean_coeffs is not None else var_or_cov).dtype
    pm = None if mean_coeffs is None else ref_patches.patch_decode(f64(mean_coeffs), f64(basis), f64(mean), size, p, s)
    pv = None if var_or_cov is None else reference.propagate_variance(f64(var_or_cov), f64(basis), size, p, s)
    return tuple(None if t is None else t.to(dt) for t in (pm, pv))


def _variance_only(moments):
    """``propagate_variance``'s backend: the same pass with no mean to decode."""
    return lambda var_or_cov, basis, grid: moments(None, var_or_cov, basis, None, grid)[1]


# Two ops, one implementation per backend: each dispatches (and reports) under its own name.
for _op, _adapt in (("decode_moments", lambda f: f), ("propagate_variance", _variance_only)):
    dispatch.register(_op, "reference", _adapt(_moments_reference))
    dispatch.register(_op, "torch", _adapt(_moments_torch))
    if HAS_TRITON:
        dispatch.register(_op, "triton", _adapt(_moments_triton))
    for _case in ("shared", "local"):
        dispatch.set_cpu_order(_op, _case, ("torch",),
                               "composed torch ops: folds with Φ² / Khatri–Rao bases (no C++ kernel yet)")


def _check(mean_coeffs, var_or_cov, basis, mean, height, width, patch_size, stride):
    check_float_tensors(var_or_cov=var_or_cov, mean_coeffs=mean_coeffs, basis=basis, mean=mean)
    p, s = resolve_stride(patch_size, stride)
    grid = grid_from_basis(basis, (height, width), p, s)
    local = check_basis(basis, grid)
    check_mean(mean, grid)
    L, r = grid.num_locations, basis.shape[-1]
    if mean_coeffs is not None and (mean_coeffs.dim() != 3 or tuple(mean_coeffs.shape[1:]) != (L, r)):
        raise ValueError(f"mean_coeffs must have shape [B, L, r] = [B, {L}, {r}]; got {tuple(mean_coeffs.shape)}")
    if var_or_cov is not None:
        shape = tuple(var_or_cov.shape)
        if var_or_cov.dim() == 4 and shape[2] != shape[3]:
            raise ValueError(f"covariance blocks must be square [B, L, r, r]; got {shape}")
        if var_or_cov.dim() not in (3, 4) or shape[1:] not in ((L, r), (L, r, r)):
            raise ValueError(
                f"var_or_cov must be [B, L, r] = [B, {L}, {r}] (diagonal) or [B, L, r, r] = [B, {L}, {r}, {r}] "
                f"(block); got {shape}"
            )
        if mean_coeffs is not None and mean_coeffs.shape[0] != shape[0]:
            raise ValueError(f"mean_coeffs has batch {mean_coeffs.shape[0]} but var_or_cov has {shape[0]}")
    return grid, local


@torch.library.custom_op("podiff::decode_moments", mutates_args=())
def _decode_moments_op(mean_coeffs: torch.Tensor, var_or_cov: torch.Tensor, basis: torch.Tensor,
                       mean: torch.Tensor | None, height: int, width: int, patch_size: int,
                       stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid, local = _check(mean_coeffs, var_or_cov, basis, mean, height, width, patch_size, stride)
    return dispatch.call("decode_moments", basis.device, basis.dtype, "local" if local else "shared",
                         mean_coeffs, var_or_cov, basis, mean, grid)


@_decode_moments_op.register_fake
def _(mean_coeffs, var_or_cov, basis, mean, height, width, patch_size, stride):
    grid, _ = _check(mean_coeffs, var_or_cov, basis, mean, height, width, patch_size, stride)
    shape = (var_or_cov.shape[0], grid.channels, height, width)
    return var_or_cov.new_empty(shape), var_or_cov.new_empty(shape)


@torch.library.custom_op("podiff::propagate_variance", mutates_args=())
def _propagate_variance_op(var_or_cov: torch.Tensor, basis: torch.Tensor, height: int, width: int,
                           patch_size: int, stride: int) -> torch.Tensor:
    grid, local = _check(None, var_or_cov, basis, None, height, width, patch_size, stride)
    return dispatch.call("propagate_variance", basis.device, basis.dtype, "local" if local else "shared",
                         var_or_cov, basis, grid)


@_propagate_variance_op.register_fake
def _(var_or_cov, basis, height, width, patch_size, stride):
    grid, _ = _check(None, var_or_cov, basis, None, height, width, patch_size, stride)
    return var_or_cov.new_empty(var_or_cov.shape[0], grid.channels, height, width)


def _variance_setup(ctx, inputs, output):
    var_or_cov, basis, height, width, patch_size, stride = inputs
    ctx.save_for_backward(var_or_cov, basis)
    ctx.geometry = (height, width, patch_size, stride)


def _variance_backward(ctx, grad):
    """The map is linear in ``var_or_cov`` and quadratic in ``Φ``; the clamp at 0 is treated as identity."""
    var_or_cov, basis = ctx.saved_tensors
    H, W, p, s = ctx.geometry
    grid = grid_from_basis(basis, (H, W), p, s)
    g = grad * cover_counts(grid, grad.device, grad.dtype).reciprocal().square()
    patches = F.unfold(g, p, stride=s).transpose(1, 2)  # [B, L, D]: backward may materialise it
    phi = basis if basis.dim() == 3 else basis.expand(grid.num_locations, *basis.shape)
    g_var = g_basis = None
    if var_or_cov.dim() == 3:
        if ctx.needs_input_grad[0]:
            g_var = torch.einsum("bld,ldk->blk", patches, phi.square())
        if ctx.needs_input_grad[1]:
            g_basis = 2 * phi * torch.einsum("bld,blk->ldk", patches, var_or_cov)
    else:
        if ctx.needs_input_grad[0]:
            g_var = torch.einsum("bld,ldk,ldm->blkm", patches, phi, phi)
        if ctx.needs_input_grad[1]:
            sym = var_or_cov + var_or_cov.transpose(-1, -2)
            g_basis = torch.einsum("bld,ldm,blkm->ldk", patches, phi, sym)
    if g_basis is not None and basis.dim() == 2:
        g_basis = g_basis.sum(0)
    return g_var, g_basis, None, None, None, None


_propagate_variance_op.register_autograd(_variance_backward, setup_context=_variance_setup)
propagate_variance_op = torch.ops.podiff.propagate_variance
decode_moments_op = torch.ops.podiff.decode_moments


def _size(image_size):
    if not isinstance(image_size, (tuple, list, torch.Size)) or len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W); got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def propagate_variance(var_or_cov: torch.Tensor, basis: torch.Tensor, image_size, patch_size: int,
                       stride: int | None = None) -> torch.Tensor:
    """Pixel variance from per-patch latent variances or covariances, in closed form.

    Args:
        var_or_cov: ``[B, L, r]`` mode variances (diagonal mode) or ``[B, L, r, r]`` per-patch
            covariances (block mode), in the units of the basis coefficients.
        basis: ``[D, r]`` (shared) or ``[L, D, r]`` (local).
        image_size: ``(H, W)``.
        patch_size, stride: the patch grid (``stride=None``: ``patch_size``).

    Returns:
        ``[B, C, H, W]``: ``(1/n_j²) Σ_{l∋j} φ_{l,j}ᵀ Σ_l φ_{l,j}`` (block) or
        ``(1/n_j²) Σ_{l∋j} Σ_k Φ²_{l,jk} σ²_{l,k}`` (diagonal), patches independent, clamped at 0.
        With ``s = p`` block mode equals the variance of the decoded ensemble exactly.
        Differentiable in ``var_or_cov`` and ``basis``.

    Example:
        >>> basis = torch.linalg.qr(torch.randn(64, 16))[0]
        >>> cov = torch.eye(16).expand(2, 49, 16, 16)                      # L = 7*7
        >>> propagate_variance(cov, basis, (32, 32), 8, stride=4).shape
        torch.Size([2, 1, 32, 32])
    """
    H, W = _size(image_size)
    p, s = resolve_stride(patch_size, stride)
    return propagate_variance_op(var_or_cov, basis, H, W, p, s)


def decode_moments(mean_coeffs: torch.Tensor, var_or_cov: torch.Tensor, basis: torch.Tensor,
                   mean: torch.Tensor | None, image_size, patch_size: int,
                   stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel mean and pixel variance from latent moments in one pass over the tokens.

    Args:
        mean_coeffs: ``[B, L, r]`` latent mean (e.g. the ensemble mean).
        var_or_cov: ``[B, L, r]`` (diagonal) or ``[B, L, r, r]`` (block) latent (co)variance.
        basis, mean: the POD basis ``[D, r]``/``[L, D, r]`` and patch mean ``[D]``/``[L, D]``/``None``.
        image_size, patch_size, stride: the patch grid.

    Returns:
        ``(pixel_mean, pixel_var)``, each ``[B, C, H, W]``: ``patch_decode(mean_coeffs, …)`` and
        ``propagate_variance(var_or_cov, …)``. Not differentiable (use the two ops separately).
    """
    H, W = _size(image_size)
    p, s = resolve_stride(patch_size, stride)
    return decode_moments_op(mean_coeffs, var_or_cov, basis, mean, H, W, p, s)
