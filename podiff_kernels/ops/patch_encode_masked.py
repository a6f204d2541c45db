"""Gappy POD encode: each patch's coefficients fitted by least squares on its valid pixels.

``c = (Φᵀ W Φ)⁻¹ Φᵀ V (x − μ)`` per patch, with ``V`` its valid pixels and
``W = V + gap_weight·(I − V)``: masked pixels are pulled towards the mean with the small
weight ``gap_weight``, which keeps every ``r×r`` system positive definite (``Φᵀ W Φ ⪰
gap_weight·ΦᵀΦ``), leaves an unmasked patch's coefficients exactly ``Φᵀ(x − μ)`` for an
orthonormal basis, and gives a fully masked patch ``c = 0`` (the mean). ``gap_weight = 0`` is
plain gappy POD (Everson & Sirovich 1995): exact for a patch in the span of ``Φ`` with
enough valid pixels to determine its ``r`` coefficients, and not finite where there are too few.

Top to bottom: the Triton kernel (one patch per program: the ``r×r`` normal equations formed
with ``tl.dot`` over the patch and solved in registers by Gauss–Jordan elimination, which
needs no pivoting on a positive definite matrix), its launcher, the CPU path (strip-wise
unfold and a batched solve), the ``torch.library`` op with its fake and autograd, the fixed-mask
projector and the public function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .._geometry import PatchGrid, check_basis, check_encode, location_row_chunks, make_grid, resolve_stride, strip
from .._triton import HAS_TRITON, block, launch, mean_strides, tl, triton
from ..reference import patches as reference

DEFAULT_GAP_WEIGHT = 1e-3
#: Widest rank the kernel holds in registers: compile_check found the r = 128 float64 system
#: spilling on sm_90 at 8 warps; wider ranks run the batched torch solve on any device.
MAX_TRITON_RANK = 64

# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _patch_encode_masked_kernel(
        x_ptr, mask_ptr, basis_ptr, mean_ptr, gap_ptr, out_ptr,
        L, nW, D, R,
        sxb, sxc, sxh, sxw,
        smb, smc, smh, smw,
        sbg, sbd, sbr,
        sml, smd,
        sob, sol, sor,
        P: tl.constexpr, S: tl.constexpr, HAS_MEAN: tl.constexpr, LOCAL: tl.constexpr, ACC: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // L
        loc = row % L
        oy = (loc // nW) * S
        ox = (loc % nW) * S
        g = loc if LOCAL else 0
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        gap = tl.load(gap_ptr).to(ACC)  # a tensor, not a scalar argument: those are float32
        gram = tl.zeros([BLOCK_R, BLOCK_R], dtype=ACC)
        rhs = tl.zeros([BLOCK_R], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            c = d // (P * P)
            ky = (d // P) % P
            kx = d % P
            valid = tl.load(mask_ptr + b * smb + c * smc + (oy + ky) * smh + (ox + kx) * smw, mask=d_ok, other=0)
            valid = valid != 0
            v = tl.load(x_ptr + b * sxb + c * sxc + (oy + ky) * sxh + (ox + kx) * sxw, mask=d_ok & valid,
                        other=0.0).to(ACC)
            if HAS_MEAN:
                v = v - tl.load(mean_ptr + loc * sml + d * smd, mask=d_ok & valid, other=0.0).to(ACC)
            weight = tl.where(valid, 1.0, gap).to(ACC)
            weight = tl.where(d_ok, weight, 0.0)
            phi = tl.load(basis_ptr + g * sbg + d[:, None] * sbd + rr[None, :] * sbr,
                          mask=d_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
            gram += tl.dot(tl.trans(phi * weight[:, None]), phi, input_precision="ieee", out_dtype=ACC)
            rhs += tl.sum(phi * v[:, None], axis=0)
        # Padding modes r >= R: an identity block, so elimination never touches them.
        eye = rr[:, None] == rr[None, :]
        gram = tl.where(eye & (rr[:, None] >= R), 1.0, gram)
        for k in range(0, R):
            pivot_row = tl.sum(tl.where(rr[:, None] == k, gram, 0.0), axis=0)
            pivot = tl.sum(tl.where(rr == k, pivot_row, 0.0), axis=0)
            column = tl.sum(tl.where(rr[None, :] == k, gram, 0.0), axis=1)
            pivot_row = pivot_row / pivot
            rhs_k = tl.sum(tl.where(rr == k, rhs, 0.0), axis=0) / pivot
            gram = tl.where(rr[:, None] == k, pivot_row[None, :], gram - column[:, None] * pivot_row[None, :])
            rhs = tl.where(rr == k, rhs_k, rhs - column * rhs_k)
        tl.store(out_ptr + b * sob + loc * sol + rr * sor, rhs.to(out_ptr.dtype.element_ty), mask=r_ok)


def _encode_masked_triton(x, mask, basis, mean, grid: PatchGrid, gap_weight: float):
    B, L, D = x.shape[0], grid.num_locations, grid.patch_dim
    local = basis.dim() == 3
    R = basis.shape[-1]
    out = torch.empty(B, L, R, device=x.device, dtype=x.dtype)
    # The normal equations are formed and solved in float64 for every input dtype: a patch with
    # few valid pixels has a condition number up to 1/gap_weight, which float32 elimination
    # would turn into 1e-4 errors; the r×r work per patch is small beside the loads.
    if R > MAX_TRITON_RANK:
        raise ValueError(f"the Triton kernel solves r <= {MAX_TRITON_RANK} in registers; got r = {R} "
                         f"(dispatch sends wider ranks to the torch path)")
    BD, BR = 16, block(R, 16, MAX_TRITON_RANK)
    warps = 8 if BR >= 32 else 4
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    sm = m.stride()
    sml, smd = mean_strides(mean)
    sb = basis.stride() if local else (0, *basis.stride())
    gap = torch.full((1,), gap_weight, device=x.device, dtype=torch.float64)
    launch(_patch_encode_masked_kernel, (B * L,),
        x, m, basis, x if mean is None else mean, gap, out,
        L, grid.n_cols, D, R,
        *x.stride(), 0 if m.shape[0] == 1 else sm[0], *sm[1:], *sb, sml, smd, *out.stride(),
        P=grid.patch_size, S=grid.stride, HAS_MEAN=mean is not None, LOCAL=local, ACC=tl.float64,
        BLOCK_D=BD, BLOCK_R=BR, num_warps=warps,
    )
    return out


# ----------------------------------------------------------------------------------------------
# CPU path (and any device): strip-wise unfold, normal equations by einsum, one batched solve
# ----------------------------------------------------------------------------------------------
def _encode_masked_torch(x, mask, basis, mean, grid: PatchGrid, gap_weight: float):
    B, p, s = x.shape[0], grid.patch_size, grid.stride
    work = torch.float64  # as in the kernel: the systems are solved in float64 for every dtype
    out = x.new_empty(B, grid.num_locations, basis.shape[-1])
    zero_filled = torch.where(mask, x, 0.0).to(work)
    valid_all = mask.expand(B, *mask.shape[1:]).to(work)
    phi_all, mean_all = basis.to(work), None if mean is None else mean.to(work)
    r = basis.shape[-1]
    row_bytes = B * grid.n_cols * (3 * grid.patch_dim + r * r) * 8
    for r0, r1 in location_row_chunks(grid, row_bytes):
        l0, l1 = r0 * grid.n_cols, r1 * grid.n_cols
        patches = F.unfold(strip(zero_filled, grid, r0, r1), p, stride=s).transpose(1, 2)  # B, l, D
        valid = F.unfold(strip(valid_all, grid, r0, r1), p, stride=s).transpose(1, 2)
        if mean_all is not None:
            patches = (patches - (mean_all if mean_all.dim() == 1 else mean_all[l0:l1])) * valid
        weight = valid + gap_weight * (1 - valid)
        if basis.dim() == 2:
            gram = torch.einsum("bld,dr,ds->blrs", weight, phi_all, phi_all)
            rhs = patches @ phi_all
        else:
            phi = phi_all[l0:l1]
            gram = torch.einsum("bld,ldr,lds->blrs", weight, phi, phi)
            rhs = torch.einsum("bld,ldr->blr", patches, phi)
        out[:, l0:l1] = torch.linalg.solve_ex(gram, rhs.unsqueeze(-1))[0].squeeze(-1).to(x.dtype)
    return out


def _encode_masked_reference(x, mask, basis, mean, grid: PatchGrid, gap_weight: float):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.patch_encode_masked(f64(x), mask, f64(basis), f64(mean), grid.patch_size, grid.stride,
                                         gap_weight).to(x.dtype)


dispatch.register("patch_encode_masked", "reference", _encode_masked_reference)
dispatch.register("patch_encode_masked", "torch", _encode_masked_torch)
if HAS_TRITON:
    dispatch.register("patch_encode_masked", "triton", _encode_masked_triton)
for _case in ("shared", "local", "wide-rank"):
    dispatch.set_cpu_order("patch_encode_masked", _case, ("torch",),
                           "on CPU: strip-wise unfold + one batched solve (no C++ kernel for this op)")
dispatch.set_gpu_order("patch_encode_masked", "wide-rank", ("torch",),
                       f"r > {MAX_TRITON_RANK}: the r×r float64 system spills one program's registers "
                       "(compile_check); a batched torch.linalg.solve instead")


# ----------------------------------------------------------------------------------------------
# torch.library op, fake, autograd
# ----------------------------------------------------------------------------------------------
def _check(x, mask, basis, mean, patch_size, stride, gap_weight) -> tuple[PatchGrid, bool]:
    grid, local = check_encode(x, basis, mean, patch_size, stride)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = valid); got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() != 4 or mask.shape[0] not in (1, x.shape[0]) or tuple(mask.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"mask must have shape [B, C, H, W] = {tuple(x.shape)} or [1, C, H, W]; "
                         f"got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}; both must be on one device")
    if not gap_weight >= 0.0:
        raise ValueError(f"gap_weight must be >= 0; got {gap_weight}")
    return grid, local


@torch.library.custom_op("podiff::patch_encode_masked", mutates_args=())
def _patch_encode_masked_op(x: torch.Tensor, mask: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None,
                            patch_size: int, stride: int, gap_weight: float) -> torch.Tensor:
    grid, local = _check(x, mask, basis, mean, patch_size, stride, gap_weight)
    case = "wide-rank" if basis.shape[-1] > MAX_TRITON_RANK else ("local" if local else "shared")
    return dispatch.call("patch_encode_masked", x.device, x.dtype, case, x, mask, basis, mean, grid, gap_weight)


@_patch_encode_masked_op.register_fake
def _(x, mask, basis, mean, patch_size, stride, gap_weight):
    grid, _ = _check(x, mask, basis, mean, patch_size, stride, gap_weight)
    return x.new_empty(x.shape[0], grid.num_locations, basis.shape[-1])


def _setup_context(ctx, inputs, output):
    x, mask, basis, mean, patch_size, stride, gap_weight = inputs
    ctx.save_for_backward(x, mask, basis, mean)
    ctx.geometry = (patch_size, stride, gap_weight)


def _backward(ctx, grad):
    # The solve makes the adjoint non-linear in the basis: recompute the forward with composed
    # torch ops (any device) and differentiate that, one patch strip at a time inside.
    x, mask, basis, mean = ctx.saved_tensors
    p, s, gap_weight = ctx.geometry
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    wanted = [t for t, need in zip((x, basis, mean), needs, strict=True) if need and t is not None]
    leaves = [t.detach().requires_grad_(any(t is w for w in wanted)) if t is not None else None
              for t in (x, basis, mean)]
    with torch.enable_grad():
        grid = make_grid(x.shape[1], x.shape[2], x.shape[3], p, s)
        out = _encode_masked_torch(leaves[0], mask, leaves[1], leaves[2], grid, gap_weight)
        needs = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, needs, grad, allow_unused=True)) if needs else iter(())
    gx, gb, gm = (next(grads) if t is not None and t.requires_grad else None for t in leaves)
    if gx is not None:
        gx = torch.where(mask, gx, 0.0)  # masked values are never read
    return gx, None, gb, gm, None, None, None


_patch_encode_masked_op.register_autograd(_backward, setup_context=_setup_context)
encode_masked_op = torch.ops.podiff.patch_encode_masked


def masked_projector(mask: torch.Tensor, basis: torch.Tensor, patch_size: int, stride: int | None = None,
                     gap_weight: float = DEFAULT_GAP_WEIGHT) -> torch.Tensor:
    """For a mask that every image shares (a coastline), the per-location analysis basis
    ``A_l = V_l Φ_l (Φ_lᵀ W_l Φ_l)⁻¹`` ``[L, D, r]``: then ``patch_encode(x, A, mean)`` on the
    zero-filled image equals ``patch_encode(x, basis, mean, mask=mask)``, with no solve per image.

    Args:
        mask: bool ``[C, H, W]`` or ``[1, C, H, W]`` (True = valid).
        basis: ``[D, r]`` or ``[L, D, r]``.
    """
    p, s = resolve_stride(patch_size, stride)
    mask = mask if mask.dim() == 4 else mask[None]
    grid = make_grid(mask.shape[1], mask.shape[2], mask.shape[3], p, s)
    check_basis(basis, grid)
    valid = F.unfold(mask.to(basis.dtype), p, stride=s).transpose(1, 2)[0]  # L, D
    phi = basis if basis.dim() == 3 else basis.expand(grid.num_locations, *basis.shape)
    weight = valid + gap_weight * (1 - valid)
    gram = torch.einsum("ld,ldr,lds->lrs", weight, phi, phi)
    # A_l = V Φ G⁻¹: solve G Aᵀ = (VΦ)ᵀ (G is symmetric).
    analysis = torch.linalg.solve_ex(gram, (valid[:, :, None] * phi).transpose(1, 2))[0].transpose(1, 2)
    return analysis.contiguous()


def patch_encode_masked(x: torch.Tensor, mask: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None,
                        patch_size: int, stride: int | None = None,
                        gap_weight: float = DEFAULT_GAP_WEIGHT) -> torch.Tensor:
    """POD coefficients of every patch of ``x`` fitted on its valid pixels (gappy POD).

    Args:
        x: images ``[B, C, H, W]``; values where ``mask`` is False are never read (NaN is fine).
        mask: bool ``[B, C, H, W]`` or ``[1, C, H, W]`` (one mask for every image); True = valid.
        basis: ``[D, r]`` shared or ``[L, D, r]`` per location (``D = C·p·p``).
        mean: ``[D]``, ``[L, D]`` or ``None``.
        patch_size, stride: as ``patch_encode``.
        gap_weight: weight ``>= 0`` of the masked pixels' pull towards the mean (see the module
            docstring); 0 is unregularised least squares.

    Returns:
        coeffs ``[B, L, r]``: ``(Φᵀ W Φ)⁻¹ Φᵀ V (x − μ)`` per patch; with no pixel masked and an
        orthonormal basis, ``patch_encode(x, basis, mean)``. Differentiable in ``x``, ``basis``
        and ``mean``.

    Example:
        >>> x = torch.randn(2, 1, 8, 8)
        >>> basis = torch.linalg.qr(torch.randn(16, 4))[0]            # D = 16, r = 4
        >>> mask = torch.rand(2, 1, 8, 8) > 0.3
        >>> patch_encode_masked(x, mask, basis, None, patch_size=4).shape
        torch.Size([2, 4, 4])
    """
    p, s = resolve_stride(patch_size, stride)
    return encode_masked_op(x, mask, basis, mean, p, s, float(gap_weight))
