"""Fused patch extraction + POD projection: ``coeffs[b, l] = Φ_lᵀ (x_{b,l} − μ_l)``.

Top to bottom: the Triton kernel, its launcher, the CPU paths (composed torch
ops and the C++ extension), the ``torch.library`` op with its fake and autograd,
and the public function. No patch matrix is ever formed by the fast paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension, dispatch
from .._geometry import (
    PatchGrid,
    check_encode,
    grouped_layout,
    location_row_chunks,
    resolve_stride,
    strip,
)
from .._triton import HAS_TRITON, acc_dtype, block, launch, mean_strides, tl, triton
from ..reference import patches as reference

# ----------------------------------------------------------------------------------------------
# Triton kernel
#
# The projection is a matmul whose rows are (image, location) pairs, grouped so that all rows
# of a group share one basis: a shared basis is one group of B*L rows; a local basis is L groups
# of B rows. Each program gathers a [BLOCK_M, BLOCK_D] tile of patch values straight from the
# image (no patch matrix in memory), subtracts the mean and multiplies by the basis tile.
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _patch_encode_kernel(
        x_ptr, basis_ptr, mean_ptr, out_ptr,
        ROWS, LPG, NBLK_M, nW, D, R,
        sxb, sxc, sxh, sxw,
        sbg, sbd, sbr,
        sml, smd,
        sob, sol, sor,
        P: tl.constexpr, S: tl.constexpr, HAS_MEAN: tl.constexpr, ACC: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = pid // NBLK_M
        rows = (pid % NBLK_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < ROWS
        b = (rows // LPG).to(tl.int64)
        loc = (g * LPG + rows % LPG).to(tl.int64)
        oy = (loc // nW) * S
        ox = (loc % nW) * S
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            c = d // (P * P)
            ky = (d // P) % P
            kx = d % P
            ptrs = (x_ptr + b[:, None] * sxb + c[None, :] * sxc
                    + (oy[:, None] + ky[None, :]) * sxh + (ox[:, None] + kx[None, :]) * sxw)
            m2 = row_ok[:, None] & d_ok[None, :]
            v = tl.load(ptrs, mask=m2, other=0.0)
            if HAS_MEAN:
                v = v - tl.load(mean_ptr + loc[:, None] * sml + d[None, :] * smd, mask=m2, other=0.0)
            phi = tl.load(basis_ptr + g * sbg + d[:, None] * sbd + rr[None, :] * sbr,
                          mask=d_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(v, phi, input_precision=PRECISION, out_dtype=ACC)
        out = out_ptr + b[:, None] * sob + loc[:, None] * sol + rr[None, :] * sor
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & r_ok[None, :])


def _encode_triton(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, grid: PatchGrid):
    B, L, D = x.shape[0], grid.num_locations, grid.patch_dim
    b3 = basis if basis.dim() == 3 else basis.unsqueeze(0)
    G, R = b3.shape[0], b3.shape[2]
    lpg = L if G == 1 else 1
    rows = B * lpg
    out = torch.empty(B, L, R, device=x.device, dtype=x.dtype)
    # The gathered [BLOCK_M, BLOCK_D] patch values carry a 64-bit address each, the accumulator is
    # [BLOCK_M, BLOCK_R], and the FMA dot holds a BLOCK_D slice of each row a thread. float64 halves
    # the widths (BLOCK_D: 16 doubles); 8 warps for tiles of 2048 elements, for float64 at 32 rows
    # and for odd patch sizes at 1024 (compile_check: 64×32×64 at 4 warps spilled on sm_80, sm_90).
    double = x.element_size() == 8
    wide = 32 if double else 64
    BM, BD, BR = block(rows, 16, wide), block(D, 16, 16 if double else 32), block(R, 16, wide)
    wide_tile = BM * max(BD, BR) >= 2048 or (BM * BD >= 1024 and grid.odd_patch)
    warps = 8 if wide_tile or (double and BM >= 32) else 4
    nblk_m = triton.cdiv(rows, BM)
    sml, smd = mean_strides(mean)
    launch(_patch_encode_kernel, (G * nblk_m, triton.cdiv(R, BR)),
        x, b3, x if mean is None else mean, out,
        rows, lpg, nblk_m, grid.n_cols, D, R,
        *x.stride(), *(b3.stride() if G > 1 else (0, *b3.stride()[1:])), sml, smd, *out.stride(),
        P=grid.patch_size, S=grid.stride, HAS_MEAN=mean is not None, ACC=acc_dtype(x.dtype),
        PRECISION="ieee", BLOCK_M=BM, BLOCK_D=BD, BLOCK_R=BR, num_warps=warps,
    )
    return out


# ----------------------------------------------------------------------------------------------
# CPU paths
# ----------------------------------------------------------------------------------------------
def _encode_torch(x, basis, mean, grid: PatchGrid):
    """Shared basis: one strided ``conv2d``. Local basis: strip-wise unfold + einsum."""
    B, C, p, s = x.shape[0], grid.channels, grid.patch_size, grid.stride
    out = x.new_empty(B, grid.num_locations, basis.shape[-1])
    if basis.dim() == 2:
        r = basis.shape[1]
        weight = basis.t().reshape(r, C, p, p)
        # A [D] mean enters as the conv bias −μᵀΦ (no extra pass); a [L, D] mean is subtracted after.
        bias = -(mean @ basis) if mean is not None and mean.dim() == 1 else None
        grid_view = out.view(B, grid.n_rows, grid.n_cols, r)
        for b in range(B):  # one image at a time: the conv output stays in cache for the transpose
            grid_view[b].copy_(F.conv2d(x[b : b + 1], weight, bias, stride=s)[0].permute(1, 2, 0))
        if mean is not None and mean.dim() == 2:
            out -= mean @ basis  # [L, r]
        return out
    row_bytes = B * grid.n_cols * grid.patch_dim * x.element_size()
    for r0, r1 in location_row_chunks(grid, row_bytes):
        l0, l1 = r0 * grid.n_cols, r1 * grid.n_cols
        patches = F.unfold(strip(x, grid, r0, r1), p, stride=s).transpose(1, 2)  # [B, l1-l0, D]
        if mean is not None:
            patches = patches - (mean if mean.dim() == 1 else mean[l0:l1])
        out[:, l0:l1] = torch.einsum("bld,ldr->blr", patches, basis[l0:l1])
    return out


def _encode_cpp(x, basis, mean, grid: PatchGrid):
    ext = _extension.load()
    b3, m2 = grouped_layout(basis, mean)
    return ext.patch_encode(x.contiguous(), b3, m2, grid.patch_size, grid.stride)


def _encode_reference(x, basis, mean, grid: PatchGrid):
    dt = x.dtype
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.patch_encode(f64(x), f64(basis), f64(mean), grid.patch_size, grid.stride).to(dt)


dispatch.register("patch_encode", "reference", _encode_reference)
dispatch.register("patch_encode", "torch", _encode_torch)
dispatch.register("patch_encode", "cpp", _encode_cpp)
if HAS_TRITON:
    dispatch.register("patch_encode", "triton", _encode_triton)
dispatch.set_cpu_order(
    "patch_encode", "shared", ("torch", "cpp"),
    "shared basis on CPU: a strided conv2d (oneDNN) measured faster than the C++ loop",
)
dispatch.set_cpu_order(
    "patch_encode", "local", ("cpp", "torch"),
    "local basis on CPU: the C++ gather-project loop measured faster than strip-wise unfold + einsum",
)


# ----------------------------------------------------------------------------------------------
# torch.library op, fake, autograd
# ----------------------------------------------------------------------------------------------
_check = check_encode


@torch.library.custom_op("podiff::patch_encode", mutates_args=())
def _patch_encode_op(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None,
                     patch_size: int, stride: int) -> torch.Tensor:
    grid, local = _check(x, basis, mean, patch_size, stride)
    case = "local" if local else "shared"
    return dispatch.call("patch_encode", x.device, x.dtype, case, x, basis, mean, grid)


@_patch_encode_op.register_fake
def _(x, basis, mean, patch_size, stride):
    grid, _ = _check(x, basis, mean, patch_size, stride)
    return x.new_empty(x.shape[0], grid.num_locations, basis.shape[-1])


def _setup_context(ctx, inputs, output):
    x, basis, mean, patch_size, stride = inputs
    ctx.save_for_backward(x, basis, mean)
    ctx.geometry = (patch_size, stride)


def _backward(ctx, grad):
    # The adjoint pieces are the registered ops (looked up at call time: no module imports another).
    decode_op, patch_correlate_op = torch.ops.podiff.patch_decode, torch.ops.podiff.patch_correlate
    x, basis, mean = ctx.saved_tensors
    p, s = ctx.geometry
    grad = grad.contiguous()
    gx = gb = gm = None
    if ctx.needs_input_grad[0]:
        # Adjoint of patch extraction: scatter-add Φ g back onto the pixels (overlaps summed).
        gx = decode_op(grad, basis, None, x.shape[2], x.shape[3], p, s, False)
    per_location = grad.sum(0)  # [L, r]
    if ctx.needs_input_grad[1]:
        gb = patch_correlate_op(x, grad, p, s, basis.dim() == 3)
        if mean is not None:
            m = mean if mean.dim() == 2 else mean.expand(per_location.shape[0], -1)
            gb = gb - (torch.einsum("ld,lr->ldr", m, per_location) if basis.dim() == 3 else m.t() @ per_location)
    if mean is not None and ctx.needs_input_grad[2]:
        if basis.dim() == 3:
            gm = -torch.einsum("ldr,lr->ld", basis, per_location)
        else:
            gm = -per_location @ basis.t()
        if mean.dim() == 1:
            gm = gm.sum(0)
    return gx, gb, gm, None, None


_patch_encode_op.register_autograd(_backward, setup_context=_setup_context)
encode_op = torch.ops.podiff.patch_encode


def patch_encode(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None,
                 patch_size: int, stride: int | None = None, *, mask: torch.Tensor | None = None,
                 gap_weight: float = 1e-3) -> torch.Tensor:
    """Projects every ``p×p`` patch of ``x`` onto a POD basis, without forming the patch matrix.

    Args:
        x: images ``[B, C, H, W]``; ``(H − p)`` and ``(W − p)`` must be multiples of the stride.
        basis: ``[D, r]`` shared by all locations, or ``[L, D, r]`` one per location;
            ``D = C·p·p`` flattened in ``(c, ky, kx)`` order, ``L = nH·nW`` row-major.
        mean: ``[D]`` or ``[L, D]`` subtracted before projecting, or ``None``.
        patch_size: ``p``.
        stride: ``s`` (``None``: ``p``, no overlap); ``1 <= s <= p``.

        mask: bool ``[B, C, H, W]`` or ``[1, C, H, W]`` (True = valid): the coefficients of each
            patch are then the least-squares fit on its valid pixels (gappy POD,
            ``patch_encode_masked``, which ``gap_weight`` regularises); masked values are not read.

    Returns:
        coeffs ``[B, L, r]`` with ``coeffs[b, l] = Φ_lᵀ (x_{b,l} − μ_l)``; differentiable in
        ``x``, ``basis`` and ``mean``.

    Example:
        >>> x = torch.randn(2, 3, 12, 12)
        >>> basis = torch.linalg.qr(torch.randn(3 * 4 * 4, 8))[0]          # D = 48, r = 8
        >>> patch_encode(x, basis, torch.zeros(48), patch_size=4, stride=2).shape
        torch.Size([2, 25, 8])
    """
    p, s = resolve_stride(patch_size, stride)
    if mask is not None:  # the registered gappy op, looked up at call time (no import between op files)
        return torch.ops.podiff.patch_encode_masked(x, mask, basis, mean, p, s, float(gap_weight))
    return encode_op(x, basis, mean, p, s)
