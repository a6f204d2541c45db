"""Ensemble moments of latent samples: per-token mean and unbiased covariance (or variance).

``samples [M, B, L, r] -> (mean [B, L, r], cov [B, L, r, r])`` with ``M − 1`` in the
denominator; ``diagonal=True`` returns ``var [B, L, r]`` and never forms the r×r blocks.
Two passes over the members (mean, then centred sums): no cancellation from
``E[xxᵀ] − mmᵀ``. The Triton kernel gives each program one token's ``(i, j)`` block of at most 32×32 modes
and keeps it on chip (``tl.dot`` of the centred member tiles).
"""

from __future__ import annotations

import torch

from .. import dispatch
from .._triton import HAS_TRITON, acc_dtype, block, launch, tl, triton
from ..reference import variance as reference

if HAS_TRITON:

    @triton.jit
    def _ensemble_moments_kernel(
        x_ptr, mean_ptr, cov_ptr,
        M, BL, R,
        sxm, sxt, sxr,
        smt, smr,
        sct, sck, scj,
        DIAGONAL: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Program (token, i, j) owns covariance block (i, j); (token, i, 0) also writes the mean of
        # modes block i. The block stays on chip; large ranks tile instead of growing the block.
        tok = tl.program_id(0).to(tl.int64)
        bi = tl.program_id(1)
        bj = tl.program_id(2)
        ri = bi * BLOCK_R + tl.arange(0, BLOCK_R)
        rj = bj * BLOCK_R + tl.arange(0, BLOCK_R)
        i_ok = ri < R
        j_ok = rj < R
        total_i = tl.zeros([BLOCK_R], dtype=ACC)
        total_j = tl.zeros([BLOCK_R], dtype=ACC)
        for m0 in range(0, M, BLOCK_M):
            mm = m0 + tl.arange(0, BLOCK_M)
            m_ok = mm < M
            total_i += tl.sum(tl.load(x_ptr + mm[:, None] * sxm + tok * sxt + ri[None, :] * sxr,
                                      mask=m_ok[:, None] & i_ok[None, :], other=0.0).to(ACC), axis=0)
            if not DIAGONAL:
                total_j += tl.sum(tl.load(x_ptr + mm[:, None] * sxm + tok * sxt + rj[None, :] * sxr,
                                          mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC), axis=0)
        mu_i = total_i / M
        mu_j = total_j / M
        if bj == 0:
            tl.store(mean_ptr + tok * smt + ri * smr, mu_i.to(mean_ptr.dtype.element_ty), mask=i_ok)
        if DIAGONAL:
            sq = tl.zeros([BLOCK_R], dtype=ACC)
        else:
            sq2 = tl.zeros([BLOCK_R, BLOCK_R], dtype=ACC)
        for m0 in range(0, M, BLOCK_M):
            mm = m0 + tl.arange(0, BLOCK_M)
            m_ok = mm < M
            ok_i = m_ok[:, None] & i_ok[None, :]
            tile_i = tl.load(x_ptr + mm[:, None] * sxm + tok * sxt + ri[None, :] * sxr, mask=ok_i, other=0.0)
            centred_i = tl.where(ok_i, tile_i.to(ACC) - mu_i[None, :], 0.0)
            if DIAGONAL:
                sq += tl.sum(centred_i * centred_i, axis=0)
            else:
                ok_j = m_ok[:, None] & j_ok[None, :]
                tile_j = tl.load(x_ptr + mm[:, None] * sxm + tok * sxt + rj[None, :] * sxr, mask=ok_j, other=0.0)
                centred_j = tl.where(ok_j, tile_j.to(ACC) - mu_j[None, :], 0.0)
                sq2 += tl.dot(tl.trans(centred_i), centred_j, input_precision=PRECISION, out_dtype=ACC)
        if DIAGONAL:
            tl.store(cov_ptr + tok * sct + ri * sck, (sq / (M - 1)).to(cov_ptr.dtype.element_ty), mask=i_ok)
        else:
            ptrs = cov_ptr + tok * sct + ri[:, None] * sck + rj[None, :] * scj
            tl.store(ptrs, (sq2 / (M - 1)).to(cov_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


def _moments_triton(samples: torch.Tensor, diagonal: bool):
    M, B, L, R = samples.shape
    x = samples.reshape(M, B * L, R)
    mean = torch.empty(B * L, R, device=samples.device, dtype=samples.dtype)
    cov = torch.empty(B * L, *((R,) if diagonal else (R, R)), device=samples.device, dtype=samples.dtype)
    sc = (cov.stride(0), cov.stride(1), 0) if diagonal else cov.stride()
    # Covariance blocks of at most 32×32 modes over at most 32 members a step: the centred tiles
    # feed an FMA dot that holds a member slice a thread (compile_check: 64×64 blocks spilled
    # kilobytes on sm_80); larger ranks tile the covariance over the grid.
    BR = block(R, 16, 64 if diagonal else 32)
    nb = triton.cdiv(R, BR)
    launch(_ensemble_moments_kernel, (B * L, nb, 1 if diagonal else nb),
        x, mean, cov, M, B * L, R, *x.stride(), *mean.stride(), *sc,
        DIAGONAL=diagonal, ACC=acc_dtype(samples.dtype), PRECISION="ieee",
        BLOCK_M=block(M, 16, 32), BLOCK_R=BR, num_warps=4,
    )
    return mean.view(B, L, R), cov.view(B, L, *cov.shape[1:])


#: The centred chunk's share of the input (and its cap): the temporaries stay a small fraction
#: of the members, whatever their size.
CHUNK_FRACTION, CHUNK_CAP, CHUNK_FLOOR = 1 / 16, 64 << 20, 256 << 10


def chunk_tokens(M: int, tokens: int, R: int, element_size: int) -> int:
    """Tokens per centred chunk: at most ``CHUNK_FRACTION`` of the input (``CHUNK_CAP`` bytes;
    at least ``CHUNK_FLOOR`` bytes so small inputs are not cut into slivers), at least one."""
    per_token = M * R * element_size
    budget = min(CHUNK_CAP, max(int(tokens * per_token * CHUNK_FRACTION), CHUNK_FLOOR))
    return max(1, min(tokens, budget // per_token))


def _moments_torch(samples: torch.Tensor, diagonal: bool):
    """Chunks over tokens so that no temporary exceeds a small fraction of the input."""
    M, B, L, R = samples.shape
    x = samples.reshape(M, B * L, R)
    mean = x.mean(0)
    cov = x.new_empty(B * L, *((R,) if diagonal else (R, R)))
    step = chunk_tokens(M, B * L, R, x.element_size())
    # One scratch chunk [tokens, r, M], reused: centring writes into it, BLAS reads it (and its
    # transpose) without copies, the diagonal squares it in place.
    scratch = x.new_empty(step, R, M)
    for t0 in range(0, B * L, step):
        t1 = min(t0 + step, B * L)
        centred = scratch[: t1 - t0]
        torch.sub(x[:, t0:t1].permute(1, 2, 0), mean[t0:t1, :, None], out=centred)
        if diagonal:
            torch.sum(centred.square_(), -1, out=cov[t0:t1])
        else:
            torch.bmm(centred, centred.transpose(1, 2), out=cov[t0:t1])
    cov /= M - 1
    return mean.view(B, L, R), cov.view(B, L, *cov.shape[1:])


def _moments_reference(samples: torch.Tensor, diagonal: bool):
    mean, cov = reference.ensemble_moments(samples.double(), diagonal)
    return mean.to(samples.dtype), cov.to(samples.dtype)


dispatch.register("ensemble_moments", "reference", _moments_reference)
dispatch.register("ensemble_moments", "torch", _moments_torch)
if HAS_TRITON:
    dispatch.register("ensemble_moments", "triton", _moments_triton)
dispatch.set_cpu_order("ensemble_moments", "default", ("torch",), "batched matmul of centred members (BLAS)")


def _check(samples: torch.Tensor) -> None:
    if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
        raise TypeError(f"samples must be a floating torch.Tensor; got {getattr(samples, 'dtype', type(samples))}")
    if samples.dim() != 4:
        raise ValueError(f"samples must have shape [M, B, L, r]; got {samples.dim()} dims, {tuple(samples.shape)}")
    if samples.shape[0] < 2:
        raise ValueError(
            f"samples needs at least M = 2 members (unbiased estimate divides by M - 1); got M = {samples.shape[0]}"
        )


@torch.library.custom_op("podiff::ensemble_moments", mutates_args=())
def _ensemble_moments_op(samples: torch.Tensor, diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _check(samples)
    return dispatch.call("ensemble_moments", samples.device, samples.dtype, "default", samples.contiguous(), diagonal)


@_ensemble_moments_op.register_fake
def _(samples, diagonal=False):
    _check(samples)
    M, B, L, R = samples.shape
    return samples.new_empty(B, L, R), samples.new_empty(B, L, *((R,) if diagonal else (R, R)))


ensemble_moments_op = torch.ops.podiff.ensemble_moments


def ensemble_moments(samples: torch.Tensor, diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean and unbiased covariance of an ensemble of latent samples.

    Args:
        samples: ``[M, B, L, r]``, ``M >= 2`` members.
        diagonal: return per-mode variances ``[B, L, r]`` instead of ``[B, L, r, r]`` blocks.

    Returns:
        ``(mean [B, L, r], cov [B, L, r, r])`` (or ``var [B, L, r]``), ``M − 1`` in the denominator.

    Example:
        >>> mean, cov = ensemble_moments(torch.randn(16, 2, 49, 8))
        >>> cov.shape
        torch.Size([2, 49, 8, 8])
    """
    return ensemble_moments_op(samples, diagonal)
