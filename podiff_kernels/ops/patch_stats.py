"""Streaming, mergeable patch mean and covariance (the POD fit's statistics), masks excluded.

``patch_stats(x, patch_size, stride, local, mask) -> PatchStats`` for one batch;
``a.merge(b)`` combines two batches exactly (Chan et al.'s parallel update), so
batches, workers and ranks (``all_reduce``) give the statistics of all the data.
Accumulators are float64 whatever the input dtype.

Groups: ``local=False`` pools every patch of every image into one group (a shared
basis); ``local=True`` keeps one group per location ``l`` whose samples are the
images (a basis per location). ``G`` is 1 or ``L``; ``D = C·p·p``.

Masked pixels (NaN in ``x``, or ``False`` in ``mask``) never enter the statistics.
With masks the moments are *pairwise complete*: the covariance of pixels ``i, j``
uses the samples where both are valid, about their means over those samples, so
a fixed land mask gives exactly the covariance of the sea pixels *of one location* (local
groups). The state is then ``[G, D, D]`` (count, pair mean, m2); without masked pixels it stays
compact (``count [G, 1, 1]``, ``mean [G, D, 1]``), and the two forms merge by broadcasting.

``complete=True`` keeps only the patches whose every pixel is valid (complete cases): the state
stays compact and the covariance is positive semi-definite. A pooled (shared) group needs it
when masks differ between its patches: pixel pairs then average over different sets of
locations, and the pairwise matrix is not a covariance (on the packaged SST's coastal patches
it has eigenvalues down to −0.016 against a leading 16).

The patch matrix is never formed whole. CPU: patches are copied (one strided copy, straight
to float64) one strip of location rows (and images) at a time within ``budget_bytes``,
centred in place and reduced with a float64 batched GEMM. CUDA: a Triton kernel gathers the
patches from the image; each program owns one group's ``16×16`` or ``32×32`` tile of pixel pairs and
accumulates its sums over the samples in float64 ``tl.dot``s, centred about per-pixel means
computed first (so a large offset cancels exactly, as in the reference), then finishes the
moments in the same form as the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dispatch
from .._geometry import PatchGrid, location_row_chunks, make_grid, resolve_stride, strip
from .._triton import HAS_TRITON, launch, tl, triton
from ..reference import patch_stats as reference

DEFAULT_BUDGET = 256 << 20


# ---------------------------------------------------------------------------------------------
# Moments of one block of samples, and the merge.


def _block_moments(X: torch.Tensor, Wv: torch.Tensor | None, complete: bool = False):
    """``X [G, S, D]`` float64 samples (``Wv`` 0/1 validity or None) -> (count, mean, m2).

    ``complete``: a sample counts only if all its ``D`` pixels are valid (compact result).
    ``X`` is a scratch buffer of the caller's and is centred in place.
    """
    G, S, D = X.shape
    if Wv is not None and complete:
        w = Wv.amin(-1, keepdim=True)  # G, S, 1: 1 for a complete patch
        n = w.sum(1, keepdim=True)  # G, 1, 1
        centre = (X * w).sum(1, keepdim=True) / n.clamp_min(1)  # G, 1, D
        Y = X.sub_(centre).mul_(w)
        return n, centre.transpose(1, 2).contiguous(), torch.bmm(Y.transpose(1, 2), Y)
    if Wv is None:
        centre = X.mean(1, keepdim=True)  # G, 1, D
        Y = X.sub_(centre)
        m2 = torch.bmm(Y.transpose(1, 2), Y)
        return X.new_full((G, 1, 1), float(S)), centre.transpose(1, 2).contiguous(), m2
    # Centre by each pixel's mean over its valid samples first: the pairwise sums below are
    # then of small numbers and lose nothing to cancellation.
    n_pix = Wv.sum(1, keepdim=True)
    centre = (X * Wv).sum(1, keepdim=True) / n_pix.clamp_min(1)  # G, 1, D
    Y = X.sub_(centre).mul_(Wv)
    count = torch.bmm(Wv.transpose(1, 2), Wv)  # G, D, D
    sy = torch.bmm(Y.transpose(1, 2), Wv)  # sy[i, j] = Σ_s w_si w_sj y_si
    syy = torch.bmm(Y.transpose(1, 2), Y)
    safe = count.clamp_min(1)
    mean = centre.transpose(1, 2) + torch.where(count > 0, sy / safe, 0.0)
    m2 = syy - torch.where(count > 0, sy * sy.transpose(1, 2) / safe, 0.0)
    return count, mean, m2


def _gather(x: torch.Tensor, patch_size: int, stride: int, local: bool) -> torch.Tensor:
    """Patches of ``x [B, C, h, W]`` as float64 samples ``[G, S, D]`` in one strided copy.

    ``local``: ``G`` = locations, ``S`` = images; else ``G = 1`` and ``S`` = (image, location).
    """
    B, C = x.shape[:2]
    view = x.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # B, C, nh, nW, p, p (no copy)
    nh, nw = view.shape[2:4]
    D = C * patch_size * patch_size
    if local:
        out = torch.empty(nh, nw, B, C, patch_size, patch_size, dtype=torch.float64, device=x.device)
        out.copy_(view.permute(2, 3, 0, 1, 4, 5))
        return out.view(nh * nw, B, D)
    out = torch.empty(B, nh, nw, C, patch_size, patch_size, dtype=torch.float64, device=x.device)
    out.copy_(view.permute(0, 2, 3, 1, 4, 5))
    return out.view(1, B * nh * nw, D)


def merge_moments(a, b):
    """Chan's parallel update of ``(count, mean, m2)`` triples, elementwise over pixel pairs.

    ``mean`` may be ``[G, D, 1]`` (compact) or ``[G, D, D]`` (pairwise); the transpose of the
    mean difference supplies the ``j`` factor in both forms, so they mix by broadcasting.
    """
    na, ma, Ma = a
    nb, mb, Mb = b
    n = na + nb
    safe = n.clamp_min(1)
    delta = mb - ma
    mean = torch.where(n > 0, ma + delta * (nb / safe), ma + 0 * delta)
    m2 = Ma + Mb + delta * delta.transpose(1, 2) * torch.where(n > 0, na * nb / safe, 0.0)
    return n, mean, m2


# ---------------------------------------------------------------------------------------------
# Triton kernel.
#
# Samples of group g: shared, s = (b, l) over all B·L patches; local, s = b with l = g. Pixel d of
# a patch is (c, ky, kx). Each program (g, i-tile, j-tile) loops over the samples in blocks,
# loads Y = w·(x − centre) for its rows i and columns j straight from the image (w: pixel
# validity × the sample's completeness), and accumulates in float64: Σ YᵢᵀYⱼ, and with pairwise
# masks also Σ WᵢᵀWⱼ (counts), Σ YᵢᵀWⱼ and Σ WᵢᵀYⱼ (the pair means' offsets).
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _patch_stats_kernel(
        x_ptr, valid_ptr, whole_ptr, centre_ptr, samples_ptr, count_ptr, mean_ptr, m2_ptr,
        S, L, nW, D,
        sxb, sxc, sxh, sxw,
        scg,
        P: tl.constexpr, STRIDE: tl.constexpr, LOCAL: tl.constexpr, MASKED: tl.constexpr,
        COMPLETE: tl.constexpr, PAIRWISE: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        g = tl.program_id(0)
        di = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dj = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        i_ok = di < D
        j_ok = dj < D
        ci = tl.load(centre_ptr + g * scg + di, mask=i_ok, other=0.0)
        cj = tl.load(centre_ptr + g * scg + dj, mask=j_ok, other=0.0)
        off_i = (di // (P * P)) * sxc + ((di // P) % P) * sxh + (di % P) * sxw
        off_j = (dj // (P * P)) * sxc + ((dj // P) % P) * sxh + (dj % P) * sxw
        syy = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
        cnt = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
        sy_ij = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
        sy_ji = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
        sum_i = tl.zeros([BLOCK_D], dtype=tl.float64)
        sum_j = tl.zeros([BLOCK_D], dtype=tl.float64)
        for s0 in range(0, S, BLOCK_S):
            smp = s0 + tl.arange(0, BLOCK_S)
            s_ok = smp < S
            if LOCAL:
                b = smp.to(tl.int64)
                loc = g + 0 * smp
            else:
                b = (smp // L).to(tl.int64)
                loc = smp % L
            base = b * sxb + ((loc // nW) * STRIDE).to(tl.int64) * sxh + ((loc % nW) * STRIDE).to(tl.int64) * sxw
            mi = s_ok[:, None] & i_ok[None, :]
            mj = s_ok[:, None] & j_ok[None, :]
            xi = tl.load(x_ptr + base[:, None] + off_i[None, :], mask=mi, other=0.0).to(tl.float64)
            xj = tl.load(x_ptr + base[:, None] + off_j[None, :], mask=mj, other=0.0).to(tl.float64)
            wi = mi.to(tl.float64)
            wj = mj.to(tl.float64)
            if MASKED:
                wi = wi * tl.load(valid_ptr + base[:, None] + off_i[None, :], mask=mi, other=0).to(tl.float64)
                wj = wj * tl.load(valid_ptr + base[:, None] + off_j[None, :], mask=mj, other=0).to(tl.float64)
            if COMPLETE:
                whole = tl.load(whole_ptr + b * L + loc, mask=s_ok, other=0).to(tl.float64)
                wi = mi.to(tl.float64) * whole[:, None]
                wj = mj.to(tl.float64) * whole[:, None]
            yi = (xi - ci[None, :]) * wi
            yj = (xj - cj[None, :]) * wj
            syy += tl.dot(tl.trans(yi), yj, out_dtype=tl.float64)
            if PAIRWISE:
                cnt += tl.dot(tl.trans(wi), wj, out_dtype=tl.float64)
                sy_ij += tl.dot(tl.trans(yi), wj, out_dtype=tl.float64)
                sy_ji += tl.dot(tl.trans(wi), yj, out_dtype=tl.float64)
            else:
                sum_i += tl.sum(yi, axis=0)
                sum_j += tl.sum(yj, axis=0)
        out = g * D * D + di[:, None] * D + dj[None, :]
        both = i_ok[:, None] & j_ok[None, :]
        if PAIRWISE:
            safe = tl.maximum(cnt, 1.0)
            has = cnt > 0
            tl.store(count_ptr + out, cnt, mask=both)
            tl.store(mean_ptr + out, ci[:, None] + tl.where(has, sy_ij / safe, 0.0), mask=both)
            tl.store(m2_ptr + out, syy - tl.where(has, sy_ij * sy_ji / safe, 0.0), mask=both)
        else:
            # Compact: every pair has the same n samples; centred about c, so subtract the
            # offset's outer product (Chan) and add it to the mean.
            n_raw = tl.load(samples_ptr + g)
            n = tl.maximum(n_raw, 1.0)
            tl.store(m2_ptr + out, syy - sum_i[:, None] * sum_j[None, :] / n, mask=both)
            if tl.program_id(2) == 0:  # no sample: mean 0, as the CPU path
                tl.store(mean_ptr + g * D + di, tl.where(n_raw > 0, ci + sum_i / n, 0.0), mask=i_ok)


# ---------------------------------------------------------------------------------------------
# Implementations.


def _stats_torch(x, valid, patch_size: int, stride: int, local: bool, budget_bytes: int, complete: bool = False):
    B, C, H, W = x.shape
    grid = make_grid(C, H, W, patch_size, stride)
    D, nW = grid.patch_dim, grid.n_cols
    copies = 3 if valid is not None else 1  # float64 samples (+ validity and its product)
    per_image_row = nW * D * 8 * copies

    def moments(xs, vs):
        return _block_moments(_gather(xs, patch_size, stride, local),
                              None if vs is None else _gather(vs, patch_size, stride, local), complete)

    if local:
        # Groups are locations: all images of a strip of location rows at once.
        parts = []
        for r0, r1 in location_row_chunks(grid, B * per_image_row, budget_bytes):
            parts.append(moments(strip(x, grid, r0, r1), None if valid is None else strip(valid, grid, r0, r1)))
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))
    # One group: strips of images × location rows, merged.
    images = max(1, min(B, budget_bytes // max(1, grid.n_rows * per_image_row)))
    total = None
    for b0 in range(0, B, images):
        xb = x[b0 : b0 + images]
        vb = None if valid is None else valid[b0 : b0 + images]
        for r0, r1 in location_row_chunks(grid, xb.shape[0] * per_image_row, budget_bytes):
            part = moments(strip(xb, grid, r0, r1), None if vb is None else strip(vb, grid, r0, r1))
            total = part if total is None else merge_moments(total, part)
    return total


def _centres(x, valid, grid: PatchGrid, local: bool):
    """Per-group pixel means over the valid samples ``[G, D]`` float64, from image-level sums (no
    patch matrix). The kernel centres about them, so its float64 sums see small numbers only;
    with complete patches the exact means differ slightly and the kernel corrects for it."""
    p, s = grid.patch_size, grid.stride
    wx = x.double() if valid is None else torch.where(valid, x.double(), 0.0)
    if valid is None:
        w = torch.ones_like(x[:1], dtype=torch.float64) * x.shape[0]
    else:
        w = valid.double().sum(0, keepdim=True)
    cols = F.unfold(wx.sum(0, keepdim=True), p, stride=s)[0]  # D, L
    counts = F.unfold(w, p, stride=s)[0]
    if not local:
        cols, counts = cols.sum(1, keepdim=True), counts.sum(1, keepdim=True)
    return torch.where(counts > 0, cols / counts.clamp_min(1), 0.0).t().contiguous()  # G, D


def _complete_patches(valid, grid: PatchGrid):
    """``[B, L]`` 1 where every pixel of the patch is valid."""
    bad = F.avg_pool2d((~valid).to(torch.float32).sum(1, keepdim=True), grid.patch_size, stride=grid.stride)
    return (bad == 0).reshape(valid.shape[0], -1).to(torch.uint8)


def _stats_triton(x, valid, patch_size: int, stride: int, local: bool, budget_bytes: int, complete: bool = False):
    B, C, H, W = x.shape
    grid = make_grid(C, H, W, patch_size, stride)
    L, D = grid.num_locations, grid.patch_dim
    G, S = (L, B) if local else (1, B * L)
    complete = complete and valid is not None
    pairwise = valid is not None and not complete
    whole = _complete_patches(valid, grid).contiguous() if complete else None
    centre = _centres(x, valid, grid, local)
    f64 = dict(dtype=torch.float64, device=x.device)
    m2 = torch.empty(G, D, D, **f64)
    if pairwise:
        count, mean = torch.empty(G, D, D, **f64), torch.empty(G, D, D, **f64)
        samples = m2  # unused
    else:
        samples = (whole.sum(0).double() if local else whole.sum().double().reshape(1)) if complete \
            else torch.full((G,), float(S), **f64)
        count, mean = samples.reshape(G, 1, 1).clone(), torch.empty(G, D, 1, **f64)
    x = x.contiguous()
    valid_u8 = valid.to(torch.uint8).contiguous() if pairwise else x
    # Tiles that compile without spills on sm_80/86/90 in every dtype (compile_check): the four
    # pairwise accumulators take 16×16 tiles; the compact one 32×32 at 8 warps, 16×16 at 2.
    BLOCK_D = 32 if D > 16 and not pairwise else 16
    tiles = triton.cdiv(D, BLOCK_D)
    launch(_patch_stats_kernel, (G, tiles, tiles),
           x, valid_u8, whole if complete else x, centre, samples, count, mean, m2,
           S, L, grid.n_cols, D,
           *x.stride(), centre.stride(0),
           P=patch_size, STRIDE=stride, LOCAL=local, MASKED=pairwise, COMPLETE=complete,
           PAIRWISE=pairwise, BLOCK_S=16, BLOCK_D=BLOCK_D,
           num_warps=8 if BLOCK_D == 32 else (4 if pairwise else 2))
    return count, mean, m2


def _stats_reference(x, valid, patch_size: int, stride: int, local: bool, budget_bytes: int, complete: bool = False):
    return reference.patch_stats(x, valid, patch_size, stride, local, complete)


dispatch.register("patch_stats", "reference", _stats_reference)
dispatch.register("patch_stats", "torch", _stats_torch)
if HAS_TRITON:
    dispatch.register("patch_stats", "triton", _stats_triton)
dispatch.set_cpu_order("patch_stats", "default", ("torch",), "strip-wise unfold + float64 GEMM (BLAS)")


# ---------------------------------------------------------------------------------------------
# torch.library op.


def _shapes(x: torch.Tensor, patch_size: int, stride: int, local: bool, pairwise: bool):
    B, C, H, W = x.shape
    grid = make_grid(C, H, W, patch_size, stride)
    G, D = (grid.num_locations if local else 1), grid.patch_dim
    return ((G, D, D), (G, D, D)) if pairwise else ((G, 1, 1), (G, D, 1)), (G, D, D)


@torch.library.custom_op("podiff::patch_stats", mutates_args=())
def _patch_stats_op(
    x: torch.Tensor, valid: torch.Tensor | None, patch_size: int, stride: int, local: bool, budget_bytes: int,
    complete: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.call(
        "patch_stats", x.device, x.dtype, "default", x.contiguous(), valid, patch_size, stride, local, budget_bytes,
        complete,
    )


@_patch_stats_op.register_fake
def _(x, valid, patch_size, stride, local, budget_bytes, complete=False):
    (count, mean), m2 = _shapes(x, patch_size, stride, local, valid is not None and not complete)
    return (x.new_empty(count, dtype=torch.float64), x.new_empty(mean, dtype=torch.float64),
            x.new_empty(m2, dtype=torch.float64))


patch_stats_op = torch.ops.podiff.patch_stats


# ---------------------------------------------------------------------------------------------
# Public API.


@dataclass
class PatchStats:
    """Mergeable float64 patch moments of ``G`` groups (1 pooled, or ``L`` locations).

    Fields: ``count`` ``[G, 1, 1]`` or ``[G, D, D]`` (samples where pixels i and j are
    both valid), ``mean`` ``[G, D, 1]`` or ``[G, D, D]`` (mean of pixel i over those
    samples), ``m2`` ``[G, D, D]`` (centred cross products), and the geometry they
    belong to. Combine with ``merge`` (or ``+``); read with ``mean_vector``,
    ``covariance``, ``samples``.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    channels: int
    image_size: tuple[int, int]
    patch_size: int
    stride: int
    local: bool

    @property
    def geometry(self) -> tuple:
        return (self.channels, tuple(self.image_size), self.patch_size, self.stride, self.local)

    @property
    def masked(self) -> bool:
        """Whether any masked pixel was seen (the pairwise ``[G, D, D]`` form)."""
        return self.count.shape[-1] != 1 or self.mean.shape[-1] != 1

    def merge(self, other: PatchStats) -> PatchStats:
        """The statistics of both sets of samples (exact; order changes only round-off)."""
        if not isinstance(other, PatchStats):
            raise TypeError(f"other must be PatchStats; got {type(other).__name__}")
        if other.geometry != self.geometry:
            raise ValueError(
                "cannot merge statistics of different geometry (channels, image size, patch size, stride, local): "
                f"{self.geometry} vs {other.geometry}"
            )
        n, mean, m2 = merge_moments((self.count, self.mean, self.m2), (other.count, other.mean, other.m2))
        return PatchStats(n, mean, m2, *self.geometry)

    __add__ = merge

    def samples(self) -> torch.Tensor:
        """Valid samples per group and pixel ``[G, D]``."""
        G, D = self.m2.shape[0], self.m2.shape[-1]
        return self.count.expand(G, D, D).diagonal(dim1=1, dim2=2).contiguous()

    def mean_vector(self) -> torch.Tensor:
        """Per-pixel mean over its valid samples ``[G, D]`` (0 where never valid)."""
        G, D = self.m2.shape[0], self.m2.shape[-1]
        return self.mean.expand(G, D, D).diagonal(dim1=1, dim2=2).contiguous()

    def covariance(self) -> torch.Tensor:
        """Unbiased (pairwise-complete) covariance ``[G, D, D]``; zero where fewer than 2 samples."""
        return reference.covariance(self.count.expand_as(self.m2), self.m2)

    def all_reduce(self, group=None) -> PatchStats:
        """The statistics over every rank of ``group`` (``torch.distributed``; sums only).

        Two all-reduces: counts and weighted means give the global pair means; then each
        rank's ``m2`` plus its mean offset from the global mean sums exactly (Chan's
        update written as a sum). Ranks that saw masks make every rank use the pairwise form.
        """
        import torch.distributed as dist

        masked = torch.tensor([1.0 if self.masked else 0.0], dtype=torch.float64, device=self.m2.device)
        dist.all_reduce(masked, op=dist.ReduceOp.MAX, group=group)
        shape = self.m2.shape
        n = self.count.expand(shape).clone() if masked.item() else self.count.clone()
        mean = self.mean.expand(shape) if masked.item() else self.mean
        weighted = n * mean
        dist.all_reduce(n, group=group)
        dist.all_reduce(weighted, group=group)
        global_mean = torch.where(n > 0, weighted / n.clamp_min(1), 0.0)
        delta = mean - global_mean
        local_n = self.count.expand(shape) if masked.item() else self.count
        m2 = self.m2 + local_n * delta * delta.transpose(1, 2)
        dist.all_reduce(m2, group=group)
        return PatchStats(n, global_mean, m2, *self.geometry)

    def to(self, device) -> PatchStats:
        return PatchStats(self.count.to(device), self.mean.to(device), self.m2.to(device), *self.geometry)


def _valid_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validity like ``x`` (bool) from NaNs and ``mask``, or None when every pixel is valid."""
    if mask is None and bool(torch.isfinite(x).all()):  # the common case: one pass, nothing masked
        return None
    nan = torch.isnan(x)
    if mask is None:
        valid = ~nan if bool(nan.any()) else None
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = valid); got {getattr(mask, 'dtype', type(mask))}")
        try:
            valid = mask.to(x.device).expand_as(x) & ~nan
        except RuntimeError:
            raise ValueError(
                f"mask must broadcast to x's shape {tuple(x.shape)} ([H, W], [B or 1, C or 1, H, W]); "
                f"got {tuple(mask.shape)}"
            ) from None
    bad = torch.isinf(x) if valid is None else torch.isinf(x) & valid
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"x has an infinite value at {idx} outside the mask; mask it (NaN or mask=False) or fix it")
    return valid


def patch_stats(
    x: torch.Tensor,
    patch_size: int,
    stride: int | None = None,
    local: bool = False,
    mask: torch.Tensor | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    complete: bool = False,
) -> PatchStats:
    """Float64 patch moments of one batch, ready to ``merge`` with others.

    Args:
        x: ``[B, C, H, W]`` images; NaN marks masked pixels.
        patch_size, stride: the patch grid (stride None means ``patch_size``); the stride must
            tile ``H`` and ``W``.
        local: one group per location (``G = L``) instead of one pooled group (``G = 1``).
        mask: optional bool, broadcastable to ``x``, True = valid.
        budget_bytes: the most extra memory the unfolded strips may take.
        complete: only patches with every pixel valid enter the statistics (complete cases:
            compact, positive semi-definite); default pairwise-complete (see the module notes).

    Returns:
        ``PatchStats``: ``mean_vector() [G, D]``, ``covariance() [G, D, D]``, ``samples() [G, D]``.

    Example:
        >>> stats = patch_stats(torch.randn(8, 1, 32, 32), 8, 4)
        >>> stats = stats.merge(patch_stats(torch.randn(8, 1, 32, 32), 8, 4))
        >>> stats.covariance().shape
        torch.Size([1, 64, 64])
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor; got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W]; got {x.dim()} dims, {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x holds no images (B = 0); statistics need at least one")
    patch_size, stride = resolve_stride(patch_size, stride)
    B, C, H, W = x.shape
    make_grid(C, H, W, patch_size, stride)
    valid = _valid_mask(x, mask)
    if valid is not None:
        x = torch.where(valid, x, 0.0)
    count, mean, m2 = patch_stats_op(x, valid, patch_size, stride, bool(local), int(budget_bytes), bool(complete))
    return PatchStats(count, mean, m2, C, (H, W), patch_size, stride, bool(local))
