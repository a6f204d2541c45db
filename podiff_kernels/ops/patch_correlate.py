"""Patch–vector correlation: ``Σ_b Σ_l x_{b,l} g_{b,l}ᵀ`` (``[D, r]``) or per location (``[L, D, r]``).

The gradient of the patch ops with respect to the basis (and, with ``g = 1``, the
mean); also the building block of patch cross-statistics. The Triton kernel is a
split-K matmul whose left operand is gathered from the image on the fly; the
split partials are summed in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension, dispatch
from .._geometry import PatchGrid, check_float_tensors, location_row_chunks, make_grid, resolve_stride, strip
from .._triton import HAS_TRITON, acc_dtype, block, launch, tl, triton
from ..reference import patches as reference

if HAS_TRITON:

    @triton.jit
    def _patch_correlate_kernel(
        x_ptr, g_ptr, out_ptr,
        ROWS, LPG, ROWS_PER_SPLIT, NBLK_D, nW, D, R,
        sxb, sxc, sxh, sxw,
        sgb, sgl, sgr,
        sos, sog, sod, sor,
        P: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        grp = pid // NBLK_D
        d = (pid % NBLK_D) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        c = d // (P * P)
        ky = (d // P) % P
        kx = d % P
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < R
        split = tl.program_id(2)
        acc = tl.zeros([BLOCK_D, BLOCK_R], dtype=ACC)
        row_start = split * ROWS_PER_SPLIT
        for m0 in range(row_start, row_start + ROWS_PER_SPLIT, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = (rows < ROWS) & (rows < row_start + ROWS_PER_SPLIT)
            b = (rows // LPG).to(tl.int64)
            loc = (grp * LPG + rows % LPG).to(tl.int64)
            oy = (loc // nW) * S
            ox = (loc % nW) * S
            ptrs = (x_ptr + b[None, :] * sxb + c[:, None] * sxc
                    + (oy[None, :] + ky[:, None]) * sxh + (ox[None, :] + kx[:, None]) * sxw)
            vt = tl.load(ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_M]
            gr = tl.load(g_ptr + b[:, None] * sgb + loc[:, None] * sgl + rr[None, :] * sgr,
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(vt, gr, input_precision=PRECISION, out_dtype=ACC)
        out = out_ptr + split * sos + grp * sog + d[:, None] * sod + rr[None, :] * sor
        tl.store(out, acc, mask=d_ok[:, None] & r_ok[None, :])


def _correlate_triton(x, grad, grid: PatchGrid, local: bool):
    B, L, D, R = x.shape[0], grid.num_locations, grid.patch_dim, grad.shape[2]
    G, lpg = (L, 1) if local else (1, L)
    rows = B * lpg
    # The gathered [BLOCK_D, BLOCK_M] tile carries a 64-bit address per element and the FMA dot
    # holds BLOCK_M values a thread per row: 32-wide tiles (compile_check: 64×64 spilled on sm_80).
    BM, BD, BR = block(rows, 16, 32), block(D, 16, 32), block(R, 16, 32)
    warps = 8 if BM * BD >= 1024 and (grid.odd_patch or x.element_size() == 8) else 4
    # Enough splits to fill a GPU when there is one group; rows per split a multiple of BLOCK_M.
    splits = 1 if local else max(1, min(64, rows // (4 * BM)))
    per_split = triton.cdiv(triton.cdiv(rows, splits), BM) * BM
    splits = triton.cdiv(rows, per_split)
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(splits, G, D, R, device=x.device, dtype=acc_t)
    nblk_d = triton.cdiv(D, BD)
    launch(_patch_correlate_kernel, (G * nblk_d, triton.cdiv(R, BR), splits),
        x, grad, partial,
        rows, lpg, per_split, nblk_d, grid.n_cols, D, R,
        *x.stride(), *grad.stride(), *partial.stride(),
        P=grid.patch_size, S=grid.stride, ACC=acc_dtype(x.dtype), PRECISION="ieee",
        BLOCK_M=BM, BLOCK_D=BD, BLOCK_R=BR, num_warps=warps,
    )
    out = partial.sum(0).to(x.dtype)
    return out if local else out[0]


def _correlate_torch(x, grad, grid: PatchGrid, local: bool):
    """Shared: the conv2d weight gradient. Local: strip-wise unfold + einsum."""
    B, C, p, s, R = x.shape[0], grid.channels, grid.patch_size, grid.stride, grad.shape[2]
    if not local:
        g = grad.view(B, grid.n_rows, grid.n_cols, R).permute(0, 3, 1, 2)
        w = torch.nn.grad.conv2d_weight(x, (R, C, p, p), g, stride=s)  # [R, C, p, p]
        return w.reshape(R, grid.patch_dim).t()
    out = x.new_empty(grid.num_locations, grid.patch_dim, R)
    row_bytes = B * grid.n_cols * grid.patch_dim * x.element_size()
    for r0, r1 in location_row_chunks(grid, row_bytes):
        l0, l1 = r0 * grid.n_cols, r1 * grid.n_cols
        patches = F.unfold(strip(x, grid, r0, r1), p, stride=s)  # [B, D, l]
        out[l0:l1] = torch.einsum("bdl,blr->ldr", patches, grad[:, l0:l1])
    return out


def _correlate_cpp(x, grad, grid: PatchGrid, local: bool):
    out = _extension.load().patch_correlate(x.contiguous(), grad.contiguous(), grid.patch_size, grid.stride, local)
    return out if local else out[0]


def _correlate_reference(x, grad, grid: PatchGrid, local: bool):
    return reference.patch_correlate(x.double(), grad.double(), grid.patch_size, grid.stride, local).to(x.dtype)


dispatch.register("patch_correlate", "reference", _correlate_reference)
dispatch.register("patch_correlate", "torch", _correlate_torch)
dispatch.register("patch_correlate", "cpp", _correlate_cpp)
if HAS_TRITON:
    dispatch.register("patch_correlate", "triton", _correlate_triton)
dispatch.set_cpu_order(
    "patch_correlate", "shared", ("torch", "cpp"),
    "pooled over locations on CPU: the conv2d weight gradient (oneDNN) measured faster than the C++ loop",
)
dispatch.set_cpu_order(
    "patch_correlate", "local", ("cpp", "torch"),
    "per location on CPU: the C++ loop measured faster than strip-wise unfold + einsum",
)


def _check(x, grad, patch_size, stride) -> PatchGrid:
    check_float_tensors(x=x, grad=grad)
    p, s = resolve_stride(patch_size, stride)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W]; got shape {tuple(x.shape)}")
    grid = make_grid(x.shape[1], x.shape[2], x.shape[3], p, s)
    if grad.dim() != 3 or grad.shape[0] != x.shape[0] or grad.shape[1] != grid.num_locations:
        raise ValueError(
            f"grad must have shape [B, L, r] = [{x.shape[0]}, {grid.num_locations}, r]; got {tuple(grad.shape)}"
        )
    return grid


@torch.library.custom_op("podiff::patch_correlate", mutates_args=())
def _patch_correlate_op(x: torch.Tensor, grad: torch.Tensor, patch_size: int, stride: int,
                        local: bool) -> torch.Tensor:
    grid = _check(x, grad, patch_size, stride)
    return dispatch.call("patch_correlate", x.device, x.dtype, "local" if local else "shared", x, grad, grid, local)


@_patch_correlate_op.register_fake
def _(x, grad, patch_size, stride, local):
    grid = _check(x, grad, patch_size, stride)
    shape = (grid.num_locations, grid.patch_dim, grad.shape[2]) if local else (grid.patch_dim, grad.shape[2])
    return x.new_empty(shape)


patch_correlate_op = torch.ops.podiff.patch_correlate


def patch_correlate(x: torch.Tensor, grad: torch.Tensor, patch_size: int, stride: int | None = None,
                    local: bool = False) -> torch.Tensor:
    """``Σ_{b,l} x_{b,l} g_{b,l}ᵀ`` → ``[D, r]``, or with ``local=True`` ``Σ_b x_{b,l} g_{b,l}ᵀ`` → ``[L, D, r]``.

    Args:
        x: images ``[B, C, H, W]``.
        grad: per-patch vectors ``[B, L, r]``.
        patch_size, stride: the patch grid (``stride=None`` means ``patch_size``).
        local: keep one ``D×r`` block per location instead of pooling over locations.
    """
    p, s = resolve_stride(patch_size, stride)
    return patch_correlate_op(x, grad, p, s, local)
