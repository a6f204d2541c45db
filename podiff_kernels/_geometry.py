"""Patch-grid geometry and argument checks shared by every patch op.

A patch vector is flattened in ``(c, ky, kx)`` order (the order of
``F.unfold``); patch locations are numbered row-major by their top-left corner.
Every check raises a ``ValueError``/``TypeError`` that names the argument, the
expected value and the actual one, so a user sees what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGrid:
    """Geometry of ``C×H×W`` images cut into ``p×p`` patches with stride ``s``."""

    channels: int
    height: int
    width: int
    patch_size: int
    stride: int

    @property
    def n_rows(self) -> int:  # nH
        return (self.height - self.patch_size) // self.stride + 1

    @property
    def n_cols(self) -> int:  # nW
        return (self.width - self.patch_size) // self.stride + 1

    @property
    def odd_patch(self) -> bool:
        """``p`` is not a power of two: the kernels' patch index arithmetic is divisions, not shifts."""
        return self.patch_size & (self.patch_size - 1) != 0

    @property
    def num_locations(self) -> int:  # L
        return self.n_rows * self.n_cols

    @property
    def patch_dim(self) -> int:  # D
        return self.channels * self.patch_size * self.patch_size

    @property
    def max_cover(self) -> int:
        """Most patches that can cover one pixel along one axis: ceil(p / s)."""
        return -(-self.patch_size // self.stride)


def _as_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def resolve_stride(patch_size, stride) -> tuple[int, int]:
    """Checks ``patch_size``/``stride`` (``None`` means ``patch_size``); 1 <= s <= p."""
    p = _as_int("patch_size", patch_size)
    s = p if stride is None else _as_int("stride", stride)
    if s > p:
        raise ValueError(
            f"stride must be <= patch_size so that every pixel is covered; got stride={s}, patch_size={p}"
        )
    return p, s


def make_grid(channels: int, height: int, width: int, patch_size: int, stride: int) -> PatchGrid:
    """Builds the grid and checks that the stride tiles ``H`` and ``W`` exactly."""
    for name, size in (("height", height), ("width", width)):
        if size < patch_size:
            raise ValueError(
                f"image {name} {size} is smaller than patch_size {patch_size}; "
                f"images must be at least one patch in each direction"
            )
        if (size - patch_size) % stride:
            lo = size - (size - patch_size) % stride
            raise ValueError(
                f"image {name} {size} is not covered by patch_size={patch_size}, stride={stride}: "
                f"({size} - {patch_size}) % {stride} = {(size - patch_size) % stride}, must be 0 "
                f"(nearest valid sizes: {lo} or {lo + stride}; PatchPOD pads automatically)"
            )
    return PatchGrid(channels, height, width, patch_size, stride)


def check_float_tensors(**tensors: torch.Tensor | None) -> torch.Tensor:
    """All given tensors are floating, of one dtype and on one device; returns the first."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype; got {t.dtype}")
        if first is None:
            first_name, first = name, t
            continue
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; all inputs must share one dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must be on one device"
            )
    return first


def check_basis(basis: torch.Tensor, grid: PatchGrid) -> bool:
    """Checks ``basis`` against the grid; returns True for a local ``[L, D, r]`` basis."""
    D, L = grid.patch_dim, grid.num_locations
    if basis.dim() == 2:
        if basis.shape[0] != D:
            raise ValueError(
                f"basis must have shape [D, r] with D = C*p*p = {grid.channels}*{grid.patch_size}^2 = {D}; "
                f"got {tuple(basis.shape)}"
            )
        return False
    if basis.dim() == 3:
        if basis.shape[0] != L or basis.shape[1] != D:
            raise ValueError(
                f"local basis must have shape [L, D, r] = [{L}, {D}, r] "
                f"(L = {grid.n_rows}*{grid.n_cols} locations, D = C*p*p = {D}); got {tuple(basis.shape)}"
            )
        return True
    raise ValueError(
        f"basis must be [D, r] (shared) or [L, D, r] (local); got {basis.dim()} dims, shape {tuple(basis.shape)}"
    )


def check_mean(mean: torch.Tensor | None, grid: PatchGrid) -> None:
    """``mean`` is ``[D]`` (one mean for all locations) or ``[L, D]`` (per location)."""
    if mean is None:
        return
    D, L = grid.patch_dim, grid.num_locations
    if tuple(mean.shape) not in ((D,), (L, D)):
        raise ValueError(f"mean must have shape [D] = [{D}] or [L, D] = [{L}, {D}]; got {tuple(mean.shape)}")


def grid_from_basis(basis: torch.Tensor, image_size, patch_size: int, stride: int) -> PatchGrid:
    """The grid of a decode: ``C`` comes from ``D = C*p*p`` of the basis."""
    if not isinstance(image_size, (tuple, list, torch.Size)) or len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W); got {image_size!r}")
    H = _as_int("image_size[0]", int(image_size[0]) if not isinstance(image_size[0], bool) else image_size[0])
    W = _as_int("image_size[1]", int(image_size[1]) if not isinstance(image_size[1], bool) else image_size[1])
    if basis.dim() not in (2, 3):
        raise ValueError(
            f"basis must be [D, r] (shared) or [L, D, r] (local); got {basis.dim()} dims, shape {tuple(basis.shape)}"
        )
    D = basis.shape[-2]
    if D % (patch_size * patch_size):
        raise ValueError(
            f"basis patch dimension D = {D} is not a multiple of patch_size^2 = {patch_size * patch_size}"
        )
    return make_grid(D // (patch_size * patch_size), H, W, patch_size, stride)


def cover_counts(grid: PatchGrid, device=None, dtype=torch.float32) -> torch.Tensor:
    """``n_j`` as an ``[H, W]`` tensor: how many patches cover each pixel (closed form)."""

    def axis(size: int, n: int) -> torch.Tensor:
        pos = torch.arange(size, device=device)
        hi = torch.clamp(pos // grid.stride, max=n - 1)
        lo = torch.clamp(pos - grid.patch_size + grid.stride, min=0) // grid.stride
        return (hi - lo + 1).to(dtype)

    return axis(grid.height, grid.n_rows)[:, None] * axis(grid.width, grid.n_cols)[None, :]


def grouped_layout(basis: torch.Tensor, mean: torch.Tensor | None):
    """``basis [G, D, r]`` and ``mean [Gm, D]`` (or None), contiguous: the C++ extension's layout."""
    b3 = (basis if basis.dim() == 3 else basis.unsqueeze(0)).contiguous()
    m2 = None if mean is None else (mean if mean.dim() == 2 else mean.unsqueeze(0)).contiguous()
    return b3, m2


def location_row_chunks(grid: PatchGrid, bytes_per_row: int, budget_bytes: int = 64 << 20):
    """Splits the ``nH`` rows of patch locations into ``(row0, row1)`` chunks within a memory budget.

    Composed-torch paths materialise patches one horizontal strip at a time, so
    their extra memory stays near ``budget_bytes`` whatever the image size.
    """
    rows = max(1, min(grid.n_rows, budget_bytes // max(1, bytes_per_row)))
    for r0 in range(0, grid.n_rows, rows):
        yield r0, min(grid.n_rows, r0 + rows)


def strip(x: torch.Tensor, grid: PatchGrid, row0: int, row1: int) -> torch.Tensor:
    """The pixel rows ``x[..., y0:y1, :]`` that patch-location rows ``[row0, row1)`` cover."""
    return x[..., row0 * grid.stride : (row1 - 1) * grid.stride + grid.patch_size, :]


def check_encode(x, basis, mean, patch_size, stride) -> tuple[PatchGrid, bool]:
    """The checks of an encode call (``patch_encode`` and its masked twin): float tensors on one
    device, ``x [B, C, H, W]`` covered by the grid, basis and mean shapes; returns the grid and
    whether the basis is local."""
    check_float_tensors(x=x, basis=basis, mean=mean)
    p, s = resolve_stride(patch_size, stride)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C, H, W]; got {x.dim()} dims, shape {tuple(x.shape)}")
    grid = make_grid(x.shape[1], x.shape[2], x.shape[3], p, s)
    local = check_basis(basis, grid)
    check_mean(mean, grid)
    return grid, local
