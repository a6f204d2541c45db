"""``PatchPOD``: the fixed, linear, variance-ordered patch latent space (fit, encode, decode, save).

Shapes: images ``[B, C, H, W]``; ``D = C·p·p`` values per patch; ``L`` patch locations;
tokens ``[B, L, r]``. ``basis="shared"`` fits one ``Φ [D, r]`` over every patch;
``basis="local"`` one ``Φ_l [D, r]`` per location (fixed grids such as SST).

>>> import torch
>>> from podiff import PatchPOD
>>> x = torch.randn(32, 1, 30, 30)                     # 30 is not covered by p=8, s=4: padded, cropped
>>> pod = PatchPOD(patch_size=8, stride=4, energy=0.9).fit(x, progress=False)
>>> tokens = pod.encode(x)                             # [32, L, r], standardised
>>> pod.decode(tokens).shape
torch.Size([32, 1, 30, 30])
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

import podiff_kernels as pk
from podiff.core.io import atomic_write, load_tensors, save_tensors  # noqa: F401  (atomic_write: re-exported)
from podiff.core.progress import progress_bar
from podiff_kernels.ops.patch_encode_masked import DEFAULT_GAP_WEIGHT
from podiff_kernels.ops.patch_stats import DEFAULT_BUDGET, PatchStats

FORMAT = "podiff.PatchPOD"
#: Relative eigenvalue floor: smaller modes are treated as exactly zero variance.
ROUNDOFF = 1e-9
FORMAT_VERSION = 1


def _covered(size: int, patch: int, stride: int) -> int:
    """The smallest size >= ``size`` that the patch grid tiles exactly."""
    if size <= patch:
        return patch
    return patch + math.ceil((size - patch) / stride) * stride


class PatchPOD:
    """Patch POD (PCA over image patches) with standardised tokens and analytic moments.

    Args:
        patch_size: ``p``, patch side in pixels.
        stride: ``s`` (None means ``p``: no overlap); ``s < p`` overlaps and averages.
        rank: number of modes ``r`` kept (``<= D``); or
        energy: keep the fewest modes whose eigenvalue share reaches ``energy`` (0 < η <= 1);
            for ``local``, one ``r`` with which every location reaches it (see ``report``).
            Neither: full rank ``D``.
        basis: ``"shared"`` (one basis) or ``"local"`` (one per location).
        min_samples: pixels of a location with fewer valid samples are left out of the fit
            (and reported), not used with unreliable statistics.
        budget_bytes: extra memory for the unfolded patch strips during ``fit`` (and the most a
            fixed mask's precomputed projector may take).
        gap_weight: regularisation of the least-squares encode of partly masked patches (the
            masked pixels' pull towards the mean; see ``podiff_kernels.patch_encode_masked``).

    After ``fit``: ``mean [G, D]``, ``basis [G, D, r]``, ``eigenvalues`` (``[r]`` or
    ``[L, r]``), ``explained_variance_ratio`` (same shape), ``report`` (a dict), with
    ``G = 1`` (shared) or ``L`` (local).
    """

    def __init__(self, patch_size: int, stride: int | None = None, rank: int | None = None,
                 energy: float | None = None, basis: str = "shared", min_samples: int = 2,
                 budget_bytes: int = DEFAULT_BUDGET, gap_weight: float = DEFAULT_GAP_WEIGHT):
        from podiff_kernels._geometry import resolve_stride

        self.patch_size, self.stride = resolve_stride(patch_size, stride)
        if basis not in ("shared", "local"):
            raise ValueError(f"basis must be 'shared' or 'local'; got {basis!r}")
        if rank is not None and energy is not None:
            raise ValueError(f"give rank or energy, not both; got rank={rank}, energy={energy}")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive int; got {rank!r}")
        if energy is not None and not (0.0 < float(energy) <= 1.0):
            raise ValueError(f"energy must be in (0, 1]; got {energy!r}")
        if int(min_samples) < 2:
            raise ValueError(f"min_samples must be at least 2 (a variance needs two samples); got {min_samples}")
        self.rank_request, self.energy = rank, (None if energy is None else float(energy))
        self.basis_kind = basis
        self.min_samples = int(min_samples)
        self.budget_bytes = int(budget_bytes)
        if not float(gap_weight) >= 0.0:
            raise ValueError(f"gap_weight must be >= 0; got {gap_weight!r}")
        self.gap_weight = float(gap_weight)
        self.gap_statistics = None  # set by fit: which patches the statistics came from
        self._fitted = False
        self._cast_cache: dict = {}

    # ------------------------------------------------------------------ geometry

    @property
    def fitted(self) -> bool:
        return self._fitted

    @property
    def local(self) -> bool:
        return self.basis_kind == "local"

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        return _covered(height, self.patch_size, self.stride), _covered(width, self.patch_size, self.stride)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pads bottom/right to the covered size (replicate where reflect cannot reach)."""
        H, W = x.shape[-2:]
        Hp, Wp = self._padded_size(H, W)
        if (Hp, Wp) == (H, W):
            return x
        pad = (0, Wp - W, 0, Hp - H)
        mode = "reflect" if (Wp - W) < W and (Hp - H) < H else "replicate"
        if x.dtype == torch.bool:
            return F.pad(x.to(torch.uint8), pad, mode=mode).bool()
        return F.pad(x, pad, mode=mode)

    def _set_valid_pixels(self, valid: torch.Tensor) -> None:
        """The fit data's valid pixels ``[C, H, W]``, and whether any is masked: a host flag, set here
        once, so decoding reads nothing off the device."""
        self.valid_pixels = valid
        self._has_masked_pixels = not bool(valid.all())

    def to(self, device) -> PatchPOD:
        """Moves mean, basis, eigenvalues and the valid-pixel mask (float64 masters) to ``device``."""
        self._check_fitted()
        for name in ("mean", "basis", "_eigenvalues", "_total_variance", "valid_pixels"):
            setattr(self, name, getattr(self, name).to(device))
        self._cast_cache = {}
        return self

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("this PatchPOD is not fitted yet; call fit(data) or PatchPOD.load(path)")

    def _check_images(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor; got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, C, H, W]; got {x.dim()} dims, {tuple(x.shape)}")
        if self._fitted:
            if x.shape[1] != self.channels:
                raise ValueError(f"{name} has {x.shape[1]} channels; this POD was fitted on {self.channels}")
            if self.local and tuple(x.shape[-2:]) != tuple(self.image_size):
                raise ValueError(
                    f"{name} is {tuple(x.shape[-2:])} pixels; a local POD works on its fitted size "
                    f"{tuple(self.image_size)}"
                )

    # ------------------------------------------------------------------ fit

    @staticmethod
    def _batches(data, mask, batch_size: int):
        """(x, mask) pairs from a tensor or an iterable of tensors / (x, mask) pairs."""
        if isinstance(data, torch.Tensor):
            for i in range(0, data.shape[0], batch_size):
                yield data[i : i + batch_size], (mask if mask is None or mask.dim() < 4 or mask.shape[0] == 1
                                                  else mask[i : i + batch_size])
            return
        if mask is not None:
            raise ValueError("mask= applies to tensor data; for an iterable, yield (x, mask) pairs")
        for item in data:
            if isinstance(item, (tuple, list)):
                if len(item) != 2:
                    raise ValueError(f"an iterable of pairs must yield (x, mask); got {len(item)} items")
                yield item[0], item[1]
            else:
                yield item, None

    def fit(self, data: torch.Tensor | Iterable, mask: torch.Tensor | None = None, *,
            batch_size: int = 64, progress: bool = True, distributed: bool | None = None,
            offsets: bool = False) -> PatchPOD:
        """Fits mean, basis and eigenvalues from ``data`` in one streaming pass.

        Args:
            data: ``[N, C, H, W]`` tensor, or any iterable of such batches or ``(x, mask)``
                pairs (a DataLoader, a generator over files). NaN marks masked pixels.
            mask: bool, broadcastable to ``data`` (True = valid), for tensor data.
            batch_size: images per statistics update for tensor data.
            progress: show a progress bar (tqdm) over batches.
            distributed: reduce the statistics over the ``torch.distributed`` default group;
                None means "if it is initialised with more than one rank". Each rank passes
                its own shard; every rank gets the same POD.
            offsets: a shared basis fitted on the patches at every pixel offset (stride 1), not
                only on the grid's: so that a patch grid shifted by any offset (``grid_shifts``,
                ``member_grids``) is described as well as the fitted one. Where the fields'
                structure is locked to the grid (a residual whose block means a mean model
                matches), the grid's own patches miss directions a shifted patch has.

        Returns:
            ``self``.
        """
        if offsets and self.local:
            raise ValueError("offsets=True fits a shared basis on patches at every offset; a local basis belongs to "
                             "its grid's locations")
        stride = 1 if offsets else self.stride
        total = None
        if isinstance(data, torch.Tensor):
            self._check_images(data, "data")
            total = math.ceil(data.shape[0] / batch_size)
        elif hasattr(data, "__len__"):
            total = len(data)
        stats: PatchStats | None = None
        complete: PatchStats | None = None
        valid_any = None
        size = channels = None
        images = 0
        dtype = torch.float32
        for x, m in progress_bar(self._batches(data, mask, batch_size), total=total, enabled=progress,
                         desc="POD statistics", unit="batch"):
            self._check_images(x, "data batch")
            if size is None:
                size, channels, dtype = tuple(x.shape[-2:]), x.shape[1], x.dtype
            elif tuple(x.shape[-2:]) != size or x.shape[1] != channels:
                raise ValueError(
                    f"every batch must have the same [C, H, W]; got {tuple(x.shape[1:])} after {(channels, *size)}"
                )
            if m is None and not bool(torch.isnan(x).any()):  # nothing masked: no copies
                any_here, xp = None, self._pad(x)
            else:
                valid = ~torch.isnan(x)
                if m is not None:
                    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                        raise TypeError(
                            f"mask must be a bool tensor (True = valid); got {getattr(m, 'dtype', type(m))}"
                        )
                    valid = valid & m.to(x.device)
                any_here, xp = valid.any(0), self._pad(torch.where(valid, x, float("nan")))
            if any_here is not None:
                valid_any = any_here if valid_any is None else valid_any | any_here
            part = pk.patch_stats(xp, self.patch_size, stride, local=self.local,
                                  budget_bytes=self.budget_bytes)
            stats = part if stats is None else stats.merge(part)
            if not self.local:  # the shared basis's complete-case statistics (see _shared_statistics)
                whole = part if any_here is None else pk.patch_stats(
                    xp, self.patch_size, stride, budget_bytes=self.budget_bytes, complete=True)
                complete = whole if complete is None else complete.merge(whole)
            images += x.shape[0]
        if stats is None:
            raise ValueError("data holds no images: the POD needs at least two")
        if distributed is None:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            import torch.distributed as dist

            stats = stats.all_reduce()
            complete = complete.all_reduce() if complete is not None else None
            n = torch.tensor([images], dtype=torch.float64, device=stats.m2.device)
            dist.all_reduce(n)
            images = int(n.item())
            seen = valid_any if valid_any is not None else torch.ones(channels, *size, dtype=torch.bool)
            v = seen.to(device=stats.m2.device, dtype=torch.uint8)
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            valid_any = v.bool()
        if images < 2:
            raise ValueError(f"data holds {images} image(s); the POD needs at least two")
        self.image_size, self.channels, self.dtype = size, channels, dtype
        self._set_valid_pixels(torch.ones(channels, *size, dtype=torch.bool) if valid_any is None
                             else valid_any.cpu())
        self._from_stats(self._shared_statistics(stats, complete), images)
        return self

    def _shared_statistics(self, pairwise: PatchStats, complete: PatchStats | None) -> PatchStats:
        """The statistics a shared basis is fitted from when patches are partly masked.

        Pooled over locations whose patches are masked at different pixels (a coast), the
        pairwise-complete matrix is no covariance: each pixel pair averages over its own set
        of locations, and with a mean that varies across the field it gets negative
        eigenvalues (the packaged SST: down to −0.016 against a leading 16, which distorted the
        leading modes and zeroed nine). So the shared basis uses the complete patches only, when
        there are at least ``D + 1`` of them (a full-rank estimate); otherwise the pairwise
        statistics with a warning. The local basis keeps the pairwise ones: a fixed mask gives
        each location exactly its sea pixels' covariance.
        """
        if self.local or complete is None or not pairwise.masked:
            self.gap_statistics = "all patches" if not pairwise.masked else "pairwise-complete"
            return pairwise
        D = pairwise.m2.shape[-1]
        n = int(complete.count.reshape(-1)[0])
        if n >= D + 1:
            self.gap_statistics = f"complete patches ({n})"
            return complete
        warnings.warn(
            f"PatchPOD.fit: only {n} patches are complete (no masked pixel), fewer than D + 1 = {D + 1}; the shared "
            "basis uses pairwise-complete statistics, which need not be a covariance (negative modes are zeroed)",
            RuntimeWarning, stacklevel=3,
        )
        self.gap_statistics = "pairwise-complete"
        return pairwise

    def _from_stats(self, stats: PatchStats, images: int) -> None:
        cov = stats.covariance()
        samples = stats.samples()  # G, D
        sparse = (samples > 0) & (samples < self.min_samples)
        if bool(sparse.any()):
            keep = (~sparse).double()
            cov = cov * keep[:, :, None] * keep[:, None, :]
            where = sorted({int(g) for g in sparse.nonzero()[:, 0]})
            warnings.warn(
                f"PatchPOD.fit: {int(sparse.sum())} patch pixels at {len(where)} location(s) had fewer than "
                f"min_samples={self.min_samples} valid samples and were left out (see pod.report)",
                RuntimeWarning, stacklevel=3,
            )
        else:
            where = []
        if not bool((samples > 0).any()):
            raise ValueError(f"data holds no valid pixel: all {images} image(s) are NaN or masked")
        eigenvalues, vectors = pk.batched_eigh(cov)  # G, D (descending), G, D, D
        # Modes below ROUNDOFF × a location's leading eigenvalue are round-off (or masked pixels'
        # null space): zero variance, so standardising never divides by them.
        eigenvalues = torch.where(eigenvalues > ROUNDOFF * eigenvalues[:, :1].clamp_min(0), eigenvalues, 0.0)
        total = eigenvalues.sum(-1, keepdim=True)
        if not bool((total > 0).any()):
            warnings.warn("PatchPOD.fit: the data is constant (every mode has zero variance); tokens will be "
                          "all zero and decode returns the mean", RuntimeWarning, stacklevel=3)
        share = torch.where(total > 0, eigenvalues.cumsum(-1) / total.clamp_min(1e-300), 1.0)
        D = cov.shape[-1]
        if self.rank_request is not None:
            if self.rank_request > D:
                raise ValueError(f"rank must be <= D = C·p·p = {D}; got rank={self.rank_request}")
            r = self.rank_request
        elif self.energy is not None:
            # Smallest r per location whose share reaches η (tolerating round-off at η = 1).
            needed = (share < self.energy - 1e-12).sum(-1) + 1
            r = int(needed.clamp_max(D).max())
        else:
            r = D
        self.rank = r
        self.mean = stats.mean_vector() * (samples >= self.min_samples)  # G, D float64
        self.basis = vectors[..., :r].contiguous()  # G, D, r
        self._eigenvalues = eigenvalues[:, :r].contiguous()  # G, r
        self._total_variance = total[:, 0]  # G
        self.report = {
            "images": images,
            "rank": r,
            "energy_reached": share[:, r - 1].tolist() if self.local else float(share[0, r - 1]),
            "sparse_pixels": int(sparse.sum()),
            "sparse_locations": where,
            "empty_locations": [int(g) for g in (samples.sum(-1) == 0).nonzero()[:, 0]],
            "statistics": self.gap_statistics,
        }
        self._fitted = True
        self._cast_cache = {}

    @classmethod
    def identity(cls, patch_size: int, channels: int, image_size, stride: int | None = None) -> PatchPOD:
        """The identity "POD" (``Φ = I``, ``r = D``, zero mean, unit eigenvalues): tokens are the
        raw patch pixels, for pixel-space diffusion with the same model and pipeline."""
        pod = cls(patch_size, stride)
        D = int(channels) * pod.patch_size**2
        pod.rank, pod.channels, pod.image_size, pod.dtype = D, int(channels), tuple(image_size), torch.float32
        pod.mean = torch.zeros(1, D, dtype=torch.float64)
        pod.basis = torch.eye(D, dtype=torch.float64)[None]
        pod._eigenvalues = torch.ones(1, D, dtype=torch.float64)
        pod._total_variance = torch.full((1,), float(D), dtype=torch.float64)
        pod._set_valid_pixels(torch.ones(pod.channels, *pod.image_size, dtype=torch.bool))
        pod.report = {"identity": True, "rank": D}
        pod._fitted = True
        return pod

    def truncated(self, rank: int) -> PatchPOD:
        """A copy that keeps the leading ``rank`` modes (the mean, mask and fit report are shared)."""
        self._check_fitted()
        if not 1 <= int(rank) <= self.rank:
            raise ValueError(f"rank must be in [1, {self.rank}]; got {rank}")
        pod = copy.copy(self)
        pod.rank, pod.rank_request, pod.energy = int(rank), int(rank), None
        pod.basis = self.basis[..., :rank].contiguous()
        pod._eigenvalues = self._eigenvalues[:, :rank].contiguous()
        pod.report = dict(self.report, rank=int(rank))
        pod._cast_cache = {}
        return pod

    def on_domain(self, image_size, valid_pixels: torch.Tensor | None = None) -> PatchPOD:
        """The same shared basis on images of ``image_size = (H, W)`` (a domain other than the
        fitted one: larger, smaller or elsewhere): ``grid``, ``encode``, ``decode`` and
        ``decode_moments`` then work on that size. ``valid_pixels [C, H, W]`` (bool; None: all):
        the pixels that hold data there (NaN elsewhere in what it decodes). A local basis belongs
        to its fitted locations: another size is an error."""
        self._check_fitted()
        size = tuple(int(n) for n in image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) with H, W >= 1; got {tuple(image_size)}")
        if size == tuple(self.image_size) and valid_pixels is None:
            return self
        if self.local:
            raise ValueError(f"a local POD basis belongs to the {self.image_size[0]}×{self.image_size[1]} grid it was "
                             f"fitted on (one basis per patch location); image_size {size} needs a shared basis")
        if valid_pixels is None:
            valid_pixels = torch.ones(self.channels, *size, dtype=torch.bool)
        if valid_pixels.dtype != torch.bool or tuple(valid_pixels.shape) != (self.channels, *size):
            raise ValueError(f"valid_pixels must be a bool [C={self.channels}, {size[0]}, {size[1]}] tensor; got "
                             f"{valid_pixels.dtype} {tuple(valid_pixels.shape)}")
        pod = copy.copy(self)
        pod.image_size = size
        pod._set_valid_pixels(valid_pixels.to(self.basis.device))
        pod._cast_cache = {}  # the fixed mask's projector is the domain's
        return pod

    # ------------------------------------------------------------------ spectra

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Kept eigenvalues ``λ_1 >= … >= λ_r``: ``[r]`` (shared) or ``[L, r]`` (local)."""
        self._check_fitted()
        return self._eigenvalues if self.local else self._eigenvalues[0]

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """``λ_k / total variance`` per mode, like scikit-learn's PCA: ``[r]`` or ``[L, r]``."""
        self._check_fitted()
        ratio = self._eigenvalues / self._total_variance[:, None].clamp_min(1e-300)
        return ratio if self.local else ratio[0]

    @property
    def grid(self) -> tuple[int, int]:
        """Patch locations ``(nH, nW)`` on the (padded) fitted image size."""
        self._check_fitted()
        Hp, Wp = self._padded_size(*self.image_size)
        return (Hp - self.patch_size) // self.stride + 1, (Wp - self.patch_size) // self.stride + 1

    def valid_locations(self) -> torch.Tensor:
        """``[L]`` bool (CPU): the patch locations holding at least one valid pixel of the fit data."""
        self._check_fitted()
        valid = self._pad(self.valid_pixels.cpu()[None].float())
        return F.unfold(valid, self.patch_size, stride=self.stride)[0].amax(0) > 0  # [C·p², L] -> [L]

    @property
    def num_locations(self) -> int:
        nH, nW = self.grid
        return nH * nW

    # ------------------------------------------------------------------ encode / decode

    def _operands(self, dtype: torch.dtype, device, standardized: bool):
        """``(basis, mean)`` in the kernels' shapes, scaled by √λ for standardised tokens."""
        key = (dtype, str(device), standardized)
        if key not in self._cast_cache:
            basis = self.basis
            if standardized:
                basis = basis * self._eigenvalues.sqrt()[:, None, :]
            mean = self.mean
            if not self.local:
                basis, mean = basis[0], mean[0]
            self._cast_cache[key] = (basis.to(device=device, dtype=dtype).contiguous(),
                                     mean.to(device=device, dtype=dtype).contiguous())
        return self._cast_cache[key]

    def _inverse_scale(self, dtype, device) -> torch.Tensor:
        """``1/√λ`` per mode (0 for zero-variance modes), ``[r]`` or ``[L, r]``."""
        lam = self._eigenvalues if self.local else self._eigenvalues[0]
        inv = torch.where(lam > 0, lam.clamp_min(1e-300).rsqrt(), 0.0)
        return inv.to(device=device, dtype=dtype)

    def gaps(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[str, torch.Tensor | None]:
        """How ``encode`` treats the masked pixels of ``x`` (reads the data once):

        - ``"none"``: nothing masked; the plain projection.
        - ``"fixed"``: every image is masked exactly where the fit data never had a value (a
          coastline): the least-squares projector of each location is constant, precomputed
          once (``masked_projector``) and applied by the plain local-basis encode.
        - ``"per-image"``: other gaps (clouds): each patch's ``r×r`` least-squares system is
          solved (``patch_encode(..., mask=)``); also returned is the padded valid mask.

        Tensors without data (``meta``, ``FakeTensorMode``) cannot be read: the fit's mask is
        assumed for them.
        """
        xp = self._pad(x)
        valid = ~torch.isnan(xp)
        if mask is not None:
            valid = valid & self._pad(mask.to(device=x.device).expand(x.shape[0], *x.shape[1:]))
        fixed = tuple(x.shape[-2:]) == tuple(self.image_size)
        try:
            if bool(valid.all()):
                return "none", None
            if fixed and bool((valid == self._pad(self.valid_pixels[None].to(x.device))).all()):
                return "fixed", None
        except RuntimeError:  # meta / fake tensors: no values to read
            return ("fixed" if self._has_masked_pixels and fixed else "none"), None
        return "per-image", valid

    def _projector(self, dtype, device) -> torch.Tensor | None:
        """The fixed mask's per-location analysis basis ``[L, D, r]`` (cached), or None when it
        would take more than ``budget_bytes`` (the per-patch solve is used then)."""
        key = ("projector", dtype, str(device))
        if key not in self._cast_cache:
            D = self.channels * self.patch_size**2
            if self.num_locations * D * self.rank * 8 > self.budget_bytes:
                return None
            mask = self._pad(self.valid_pixels[None].to(self.basis.device))
            basis = self.basis if self.local else self.basis[0]
            analysis = pk.masked_projector(mask, basis, self.patch_size, self.stride, self.gap_weight)
            self._cast_cache[key] = analysis.to(device=device, dtype=dtype).contiguous()
        return self._cast_cache[key]

    def encode(self, x: torch.Tensor, standardized: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> tokens ``[B, L, r]`` (``a_k/√λ_k`` when standardised).

        Masked pixels (NaN in ``x``, or False in the optional bool ``mask``) are left out: each
        patch's coefficients are the least-squares fit on its valid pixels (gappy POD,
        regularised by ``gap_weight``; see ``gaps`` for how). Sizes the stride does not cover
        are reflect-padded.
        """
        self._check_fitted()
        self._check_images(x)
        basis, mean = self._operands(x.dtype, x.device, standardized=False)
        how, valid = self.gaps(x, mask)
        xp = self._pad(x)
        projector = self._projector(x.dtype, x.device) if how == "fixed" else None
        if how == "fixed" and projector is None:
            how, valid = "per-image", ~torch.isnan(xp)
        if how == "none":
            coeffs = pk.patch_encode(xp, basis, mean, self.patch_size, self.stride)
        elif how == "fixed":
            coeffs = pk.patch_encode(torch.nan_to_num(xp, nan=0.0), projector, mean, self.patch_size, self.stride)
        else:
            coeffs = pk.patch_encode(xp, basis, mean, self.patch_size, self.stride, mask=valid,
                                     gap_weight=self.gap_weight)
        return coeffs * self._inverse_scale(x.dtype, x.device) if standardized else coeffs

    def _check_tokens(self, tokens: torch.Tensor, name: str) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError(f"{name} must be [B, L, r]; got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.shape[-1] != self.rank or tokens.shape[1] != self.num_locations:
            raise ValueError(
                f"{name} must be [B, L={self.num_locations}, r={self.rank}]; got {tuple(tokens.shape)}"
            )

    def _finish(self, image: torch.Tensor, image_size, mask_invalid: bool = True) -> torch.Tensor:
        H, W = image_size
        image = image[..., :H, :W]
        if mask_invalid and self._has_masked_pixels:  # a host flag: no device read inside a step
            image = image.masked_fill(~self.valid_pixels.to(image.device), float("nan"))
        return image

    def decode(self, tokens: torch.Tensor, standardized: bool = True, image_size=None) -> torch.Tensor:
        """Tokens ``[B, L, r]`` -> images ``[B, C, H, W]``; pixels never valid in the fit data are NaN.

        ``image_size`` (shared basis only) decodes a size other than the fitted one.
        """
        self._check_fitted()
        image_size = tuple(image_size or self.image_size)
        if self.local or image_size == tuple(self.image_size):
            self._check_tokens(tokens, "tokens")
        basis, mean = self._operands(tokens.dtype, tokens.device, standardized)
        padded = self._padded_size(*image_size)
        out = pk.patch_decode(tokens, basis, mean, padded, self.patch_size, self.stride)
        return self._finish(out, image_size, mask_invalid=image_size == tuple(self.image_size))

    def decode_moments(self, mean_tokens: torch.Tensor, var_or_cov: torch.Tensor,
                       standardized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel mean and variance ``[B, C, H, W]`` from token mean ``[B, L, r]`` and
        variance ``[B, L, r]`` (diagonal) or covariance ``[B, L, r, r]`` (block), in closed form.

        Standardisation is undone inside (the basis is scaled by ``√λ``).
        """
        self._check_fitted()
        self._check_tokens(mean_tokens, "mean_tokens")
        basis, mean = self._operands(mean_tokens.dtype, mean_tokens.device, standardized)
        padded = self._padded_size(*self.image_size)
        pixel_mean, pixel_var = pk.decode_moments(mean_tokens, var_or_cov, basis, mean, padded,
                                                  self.patch_size, self.stride)
        return self._finish(pixel_mean, self.image_size), self._finish(pixel_var, self.image_size)

    # ------------------------------------------------------------------ save / load

    def config(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "patch_size": self.patch_size, "stride": self.stride,
            "rank_request": self.rank_request, "energy": self.energy, "basis": self.basis_kind,
            "min_samples": self.min_samples, "budget_bytes": self.budget_bytes, "gap_weight": self.gap_weight,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes one safetensors file (tensors + JSON config in its metadata), atomically."""
        self._check_fitted()
        state = dict(self.config(), rank=self.rank, image_size=list(self.image_size), channels=self.channels,
                     dtype=str(self.dtype).removeprefix("torch."), report=self.report)
        state.pop("format", None)
        tensors = {"mean": self.mean, "basis": self.basis, "eigenvalues": self._eigenvalues,
                   "total_variance": self._total_variance, "valid_pixels": self.valid_pixels.to(torch.uint8)}
        save_tensors(path, tensors, FORMAT, **state)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchPOD:
        """Reads a file written by ``save``; a truncated, corrupted or foreign file is a ValueError."""
        path = Path(path)
        tensors, state = load_tensors(path, FORMAT, "PatchPOD file")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is {FORMAT} version {state.get('version')}; this podiff reads version {FORMAT_VERSION}"
            )
        missing = {"mean", "basis", "eigenvalues", "total_variance", "valid_pixels"} - set(tensors)
        if missing:
            raise ValueError(f"{path} is missing tensors {sorted(missing)}")
        pod = cls(state["patch_size"], state["stride"], state["rank_request"], state["energy"], state["basis"],
                  state["min_samples"], state["budget_bytes"], state.get("gap_weight", DEFAULT_GAP_WEIGHT))
        pod.rank, pod.image_size, pod.channels = state["rank"], tuple(state["image_size"]), state["channels"]
        pod.dtype = getattr(torch, state["dtype"])
        pod.report = state["report"]
        pod.mean, pod.basis = tensors["mean"], tensors["basis"]
        pod._eigenvalues, pod._total_variance = tensors["eigenvalues"], tensors["total_variance"]
        pod._set_valid_pixels(tensors["valid_pixels"].bool())
        pod._fitted = True
        return pod

    def __repr__(self) -> str:
        fitted = f", rank={self.rank}, image_size={self.image_size}" if self._fitted else ", unfitted"
        return f"PatchPOD(patch_size={self.patch_size}, stride={self.stride}, basis={self.basis_kind!r}{fitted})"
