"""Fused POD reconstruction + overlap averaging: ``x̂ = D⁻¹ Σ_l R_lᵀ (μ_l + Φ_l a_l)``.

Top to bottom: the output-centric Triton kernel (each program owns a tile of output
pixels and gathers the patches covering it; closed-form cover count; no atomics,
deterministic), its launcher, the CPU paths, the ``torch.library`` op with fake and
autograd, and the public function. ``average=False`` gives the plain overlap *sum*,
the exact adjoint of patch extraction (used by ``patch_encode``'s backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension, dispatch
from .._geometry import (
    PatchGrid,
    check_basis,
    check_float_tensors,
    check_mean,
    cover_counts,
    grid_from_basis,
    grouped_layout,
    location_row_chunks,
    resolve_stride,
)
from .._triton import HAS_TRITON, acc_dtype, block, launch, mean_strides, next_pow2, tl, triton
from ..reference import patches as reference

if HAS_TRITON:

    @triton.jit
    def _patch_decode_kernel(
        c_ptr, basis_ptr, mean_ptr, out_ptr,
        C, H, W, nH, nW, R,
        scb, scl, scr,
        sbl, sbd, sbr,
        sml, smd,
        sob, soc, soh, sow,
        P: tl.constexpr, S: tl.constexpr, NCOVER: tl.constexpr, HAS_MEAN: tl.constexpr,
        AVERAGE: tl.constexpr, ACC: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_bc = tl.program_id(0)
        b = (pid_bc // C).to(tl.int64)
        ch = pid_bc % C
        pix = tl.program_id(1) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
        pix_ok = pix < H * W
        y = pix // W
        x = pix % W
        acc = tl.zeros([BLOCK_PIX], dtype=ACC)
        for iy in tl.static_range(NCOVER):
            oy = y // S - iy
            ky = y - oy * S
            ok_y = (oy >= 0) & (oy < nH) & (ky < P)
            for ix in tl.static_range(NCOVER):
                ox = x // S - ix
                kx = x - ox * S
                ok = pix_ok & ok_y & (ox >= 0) & (ox < nW) & (kx < P)
                loc = (oy * nW + ox).to(tl.int64)
                d = (ch * P + ky) * P + kx
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    m2 = ok[:, None] & (rr < R)[None, :]
                    a = tl.load(c_ptr + b * scb + loc[:, None] * scl + rr[None, :] * scr, mask=m2, other=0.0)
                    phi = tl.load(basis_ptr + loc[:, None] * sbl + d[:, None] * sbd + rr[None, :] * sbr,
                                  mask=m2, other=0.0)
                    acc += tl.sum(a.to(ACC) * phi.to(ACC), axis=1)
                if HAS_MEAN:
                    acc += tl.load(mean_ptr + loc * sml + d * smd, mask=ok, other=0.0).to(ACC)
        if AVERAGE:
            # n_j = (# covering rows) * (# covering columns), closed form.
            ny = tl.minimum(y // S, nH - 1) - tl.maximum(y - P + S, 0) // S + 1
            nx = tl.minimum(x // S, nW - 1) - tl.maximum(x - P + S, 0) // S + 1
            acc = acc / tl.where(pix_ok, ny * nx, 1).to(ACC)  # masked lanes: avoid 0/0
        tl.store(out_ptr + b * sob + ch * soc + y * soh + x * sow, acc.to(out_ptr.dtype.element_ty), mask=pix_ok)


def _decode_triton(coeffs, basis, mean, grid: PatchGrid, average: bool):
    B, R = coeffs.shape[0], coeffs.shape[2]
    C, H, W = grid.channels, grid.height, grid.width
    out = torch.empty(B, C, H, W, device=coeffs.device, dtype=coeffs.dtype)
    sbl = basis.stride(0) if basis.dim() == 3 else 0
    sbd, sbr = basis.stride()[-2:]
    sml, smd = mean_strides(mean)
    # A [BLOCK_PIX, BLOCK_R] tile of coefficients, basis values and their 64-bit addresses per
    # program: 8 values a thread at 4 warps (4 for float64). 256 pixels by 32 modes used all 255
    # registers and spilled on every architecture; 16 a thread fits but leaves 19 % occupancy.
    BR = block(R, 16, 32)
    BP = max(16, min(next_pow2(H * W), (1024 if coeffs.element_size() <= 4 else 512) // BR))
    launch(_patch_decode_kernel, (B * C, triton.cdiv(H * W, BP)),
        coeffs, basis, coeffs if mean is None else mean, out,
        C, H, W, grid.n_rows, grid.n_cols, R,
        *coeffs.stride(), sbl, sbd, sbr, sml, smd, *out.stride(),
        P=grid.patch_size, S=grid.stride, NCOVER=grid.max_cover, HAS_MEAN=mean is not None,
        AVERAGE=average, ACC=acc_dtype(coeffs.dtype), BLOCK_PIX=BP, BLOCK_R=BR, num_warps=4,
    )
    return out


def _mean_image(mean: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """``Σ_l R_lᵀ μ_l`` as ``[1, C, H, W]`` (the same for every image)."""
    cols = mean.expand(grid.num_locations, -1) if mean.dim() == 1 else mean
    return F.fold(cols.t().unsqueeze(0), (grid.height, grid.width), grid.patch_size, stride=grid.stride)


def _decode_torch(coeffs, basis, mean, grid: PatchGrid, average: bool):
    """Shared basis: one ``conv_transpose2d``. Local basis: strip-wise einsum + ``F.fold``."""
    B, R = coeffs.shape[0], coeffs.shape[2]
    C, H, W, p, s = grid.channels, grid.height, grid.width, grid.patch_size, grid.stride
    if basis.dim() == 2:
        a = coeffs.view(B, grid.n_rows, grid.n_cols, R).permute(0, 3, 1, 2)
        weight = basis.t().reshape(R, C, p, p)
        out = coeffs.new_empty(B, C, H, W)
        for b in range(B):  # one image at a time: smaller oneDNN workspace, warmer cache
            out[b] = F.conv_transpose2d(a[b : b + 1], weight, stride=s)[0]
    else:
        out = coeffs.new_zeros(B, C, H, W)
        row_bytes = B * grid.n_cols * grid.patch_dim * coeffs.element_size()
        for r0, r1 in location_row_chunks(grid, row_bytes):
            l0, l1 = r0 * grid.n_cols, r1 * grid.n_cols
            cols = torch.einsum("ldr,blr->bdl", basis[l0:l1], coeffs[:, l0:l1])
            y0, y1 = r0 * s, (r1 - 1) * s + p
            out[:, :, y0:y1] += F.fold(cols, (y1 - y0, W), p, stride=s)
    if mean is not None:
        out += _mean_image(mean, grid)
    if average:
        out *= cover_counts(grid, out.device, out.dtype).reciprocal()
    return out


def _decode_cpp(coeffs, basis, mean, grid: PatchGrid, average: bool):
    ext = _extension.load()
    b3, m2 = grouped_layout(basis, mean)
    return ext.patch_decode(coeffs.contiguous(), b3, m2, grid.height, grid.width, grid.patch_size, grid.stride,
                            average)


def _decode_reference(coeffs, basis, mean, grid: PatchGrid, average: bool):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    out = reference.patch_decode(f64(coeffs), f64(basis), f64(mean), (grid.height, grid.width),
                                 grid.patch_size, grid.stride, average)
    return out.to(coeffs.dtype)


dispatch.register("patch_decode", "reference", _decode_reference)
dispatch.register("patch_decode", "torch", _decode_torch)
dispatch.register("patch_decode", "cpp", _decode_cpp)
if HAS_TRITON:
    dispatch.register("patch_decode", "triton", _decode_triton)
dispatch.set_cpu_order(
    "patch_decode", "shared", ("torch", "cpp"),
    "shared basis on CPU: conv_transpose2d (oneDNN) measured faster than the C++ gather loop",
)
dispatch.set_cpu_order(
    "patch_decode", "local", ("cpp", "torch"),
    "local basis on CPU: the C++ output-centric loop measured faster than strip-wise einsum + fold",
)


def _check(coeffs, basis, mean, height, width, patch_size, stride) -> tuple[PatchGrid, bool]:
    check_float_tensors(coeffs=coeffs, basis=basis, mean=mean)
    p, s = resolve_stride(patch_size, stride)
    grid = grid_from_basis(basis, (height, width), p, s)
    local = check_basis(basis, grid)
    check_mean(mean, grid)
    expected = (grid.num_locations, basis.shape[-1])
    if coeffs.dim() != 3 or tuple(coeffs.shape[1:]) != expected:
        raise ValueError(
            f"coeffs must have shape [B, L, r] = [B, {expected[0]}, {expected[1]}] "
            f"(L = {grid.n_rows}*{grid.n_cols} for image {height}x{width}, p={p}, s={s}); got {tuple(coeffs.shape)}"
        )
    return grid, local


@torch.library.custom_op("podiff::patch_decode", mutates_args=())
def _patch_decode_op(coeffs: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, height: int,
                     width: int, patch_size: int, stride: int, average: bool = True) -> torch.Tensor:
    grid, local = _check(coeffs, basis, mean, height, width, patch_size, stride)
    case = "local" if local else "shared"
    return dispatch.call("patch_decode", coeffs.device, coeffs.dtype, case, coeffs, basis, mean, grid, average)


@_patch_decode_op.register_fake
def _(coeffs, basis, mean, height, width, patch_size, stride, average=True):
    grid, _ = _check(coeffs, basis, mean, height, width, patch_size, stride)
    return coeffs.new_empty(coeffs.shape[0], grid.channels, height, width)


def _setup_context(ctx, inputs, output):
    coeffs, basis, mean, height, width, patch_size, stride, average = inputs
    ctx.save_for_backward(coeffs, basis, mean)
    ctx.geometry = (height, width, patch_size, stride, average)


def _backward(ctx, grad):
    # The adjoint pieces are the registered ops (looked up at call time: no module imports another).
    encode_op, patch_correlate_op = torch.ops.podiff.patch_encode, torch.ops.podiff.patch_correlate
    coeffs, basis, mean = ctx.saved_tensors
    H, W, p, s, average = ctx.geometry
    if average:  # the averaging is a fixed diagonal scaling: push it onto the incoming gradient
        grid = grid_from_basis(basis, (H, W), p, s)
        grad = grad * cover_counts(grid, grad.device, grad.dtype).reciprocal()
    grad = grad.contiguous()
    gc = gb = gm = None
    if ctx.needs_input_grad[0]:
        gc = encode_op(grad, basis, None, p, s)
    if ctx.needs_input_grad[1]:
        gb = patch_correlate_op(grad, coeffs.contiguous(), p, s, basis.dim() == 3)
    if mean is not None and ctx.needs_input_grad[2]:
        ones = grad.new_ones(grad.shape[0], coeffs.shape[1], 1)
        gm = patch_correlate_op(grad, ones, p, s, mean.dim() == 2)[..., 0]
    return gc, gb, gm, None, None, None, None, None


_patch_decode_op.register_autograd(_backward, setup_context=_setup_context)
patch_decode_op = torch.ops.podiff.patch_decode


def patch_decode(coeffs: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, image_size,
                 patch_size: int, stride: int | None = None) -> torch.Tensor:
    """Reconstructs images from POD coefficients; each pixel is the mean over the patches covering it.

    Args:
        coeffs: ``[B, L, r]`` with ``L = nH·nW`` row-major patch locations.
        basis: ``[D, r]`` (shared) or ``[L, D, r]`` (local), ``D = C·p·p`` in ``(c, ky, kx)`` order.
        mean: ``[D]`` or ``[L, D]`` added back, or ``None``.
        image_size: ``(H, W)``; ``(H − p)``, ``(W − p)`` multiples of the stride.
        patch_size: ``p``.
        stride: ``s`` (``None``: ``p``); ``1 <= s <= p``.

    Returns:
        ``[B, C, H, W]``, ``x̂_j = (1/n_j) Σ_{l ∋ j} (μ_l + Φ_l a_l)_j``. With ``s = p`` and a
        full-rank orthonormal basis this inverts ``patch_encode`` exactly. Differentiable in
        ``coeffs``, ``basis`` and ``mean``.

    Example:
        >>> basis = torch.linalg.qr(torch.randn(48, 48))[0]                 # C=3, p=4, full rank
        >>> x = torch.randn(2, 3, 12, 12)
        >>> from podiff_kernels import patch_encode
        >>> a = patch_encode(x, basis, None, 4, stride=2)
        >>> torch.allclose(patch_decode(a, basis, None, (12, 12), 4, stride=2), x, atol=1e-5)
        True
    """
    p, s = resolve_stride(patch_size, stride)
    if not isinstance(image_size, (tuple, list, torch.Size)) or len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W); got {image_size!r}")
    return patch_decode_op(coeffs, basis, mean, int(image_size[0]), int(image_size[1]), p, s, True)
