"""Windows of a patch grid that the denoiser trains on: shifted grids and crops.

A window is the top-left pixel ``(top, left)`` of a crop of the field that whole patches tile;
its tokens form a ``grid`` placed at ``origin = (top, left) / p`` in the fitted grid's token
units. ``TrainingWindows.draw`` picks one per batch, uniformly along each axis:

- whole grid, no shifts: only ``(0, 0)`` (the fitted grid);
- ``shifts``: the grid shifted by any pixel offset below ``p`` along an axis with more than one
  patch, reaching past the field's edge so that it covers every pixel: its top at ``-(p - 1)``
  to 0, one token more there than the fitted grid (the pixels outside the field are NaN, as
  where members are drawn on a shifted grid, ``PipelineConfig.member_grids``);
- ``crop = c``: ``c`` tokens along each axis that has more than ``c``, at any whole-patch
  position inside the field, or with ``shifts`` at any pixel, reaching less than a patch past
  its edges (``PipelineConfig.crop``: training cost set by the crop, not the field).

>>> from podiff.latent.windows import TrainingWindows
>>> w = TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), shifts=False, crop=3)
>>> w.count, w.geometry((4, 8))
(8, {'grid': (3, 3), 'origin': (1.0, 2.0)})
>>> TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), shifts=True).geometry((-2, 0))
{'grid': (5, 6), 'origin': (-0.5, 0.0)}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainingWindows:
    """The windows of a fitted patch grid ``grid = (nH, nW)`` of ``patch``-pixel patches over a
    field of ``size = (H, W)`` pixels that training draws from (module doc)."""

    grid: tuple[int, int]
    patch: int
    size: tuple[int, int]
    shifts: bool = False
    crop: int = 0

    def __post_init__(self):
        if int(self.crop) < 0 or int(self.crop) == 1:
            raise ValueError(f"crop must be 0 (the whole grid) or at least 2 tokens; got {self.crop}")

    def _axis(self, axis: int) -> tuple[list[int], int | None]:
        """The window tops along ``axis`` and the tokens a window holds there (None: by its top)."""
        n, p, size = self.grid[axis], self.patch, self.size[axis]
        if self.crop and self.crop < n:
            last = size - self.crop * p  # wholly inside the field
            if self.shifts:  # any pixel, less than a patch past either edge
                return list(range(-(p - 1), last + p)), self.crop
            return list(range(0, last + 1, p)), self.crop
        if self.shifts and n > 1:  # past the field's first edge, to cover it all
            return list(range(-(p - 1), 1)), None
        return [0], None

    @property
    def count(self) -> int:
        """How many windows there are (1: only the fitted grid)."""
        return len(self._axis(0)[0]) * len(self._axis(1)[0])

    def draw(self, generator: torch.Generator) -> tuple[int, int]:
        """One window, uniformly along each axis, from ``generator``."""
        tops = [self._axis(axis)[0] for axis in (0, 1)]
        return tuple(t[int(torch.randint(0, len(t), (1,), generator=generator))] for t in tops)

    def geometry(self, window) -> dict:
        """``{"grid", "origin"}`` of the tokens of ``window``."""
        grid, origin = [], []
        for axis, top in enumerate(window):
            tops, tokens = self._axis(axis)
            if int(top) not in tops:
                raise ValueError(f"window {tuple(window)}: its {('top', 'left')[axis]} must be one of "
                                 f"{_span(tops)} for {self}; got {top}")
            grid.append(tokens if tokens is not None else -(-(self.size[axis] - int(top)) // self.patch))
            origin.append(int(top) / self.patch)
        return {"grid": tuple(grid), "origin": tuple(origin)}

    def is_fitted(self, window) -> bool:
        """Whether ``window`` is the fitted grid itself (the whole grid at ``(0, 0)``)."""
        return tuple(window) == (0, 0) and self.geometry(window)["grid"] == tuple(self.grid)

    def crop_slices(self, window) -> tuple[slice, slice]:
        """The pixel rows and columns of ``window``'s crop (with ``shifts``, reaching past the
        field's edges: ``crop_field`` pads them)."""
        grid = self.geometry(window)["grid"]
        return tuple(slice(int(top), int(top) + n * self.patch) for top, n in zip(window, grid, strict=True))

    def describe(self) -> dict:
        """JSON-ready: the windows' count, crop and shifts (``train.json``)."""
        return {"windows": self.count, "crop": self.crop, "shifts": self.shifts}


def member_windows(grid: tuple[int, int], patch: int, count: int) -> list[tuple[int, int]]:
    """The top-left pixels of the ``count`` patch grids members are drawn on
    (``PipelineConfig.member_grids``): the fitted grid, then shifted by half a patch (diagonally
    for 2; by rows, by columns and diagonally for 4), or by every quarter of a patch along each
    axis for 16 (``patch`` a multiple of 4), reaching past the field's first edges as
    ``grid_shifts`` windows do (no shift along an axis of one patch, as in training).

    >>> member_windows((4, 108), 4, 4)
    [(0, 0), (-2, 0), (0, -2), (-2, -2)]
    """
    if count not in (1, 2, 4, 16):
        raise ValueError(f"count must be 1, 2, 4 or 16 grids; got {count}")
    if count == 16:
        if patch % 4:
            raise ValueError(f"16 member grids shift by quarters of a patch: patch must be a multiple of 4; "
                             f"got {patch}")
        steps = [[-(k * patch // 4) if n > 1 else 0 for k in range(4)] for n in grid]
        return [(dy, dx) for dy in steps[0] for dx in steps[1]]
    dy, dx = (-(patch // 2) if n > 1 else 0 for n in grid)
    return {1: [(0, 0)], 2: [(0, 0), (dy, dx)], 4: [(0, 0), (dy, 0), (0, dx), (dy, dx)]}[count]


def crop_field(field: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """``field [..., H, W]``'s pixels ``rows, cols`` (``crop_slices``), NaN where they lie outside it."""
    H, W = field.shape[-2:]
    pads = (max(0, -cols.start), max(0, cols.stop - W), max(0, -rows.start), max(0, rows.stop - H))
    if any(pads):
        field = torch.nn.functional.pad(field, pads, value=float("nan"))
    top, left = rows.start + pads[2], cols.start + pads[0]
    return field[..., top : top + rows.stop - rows.start, left : left + cols.stop - cols.start]


def _span(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"{values[0]}, {values[1]}, ..., {values[-1]}"


__all__ = ["TrainingWindows", "crop_field", "member_windows"]
