"""Covariates: what a downscaling model knows beside the coarse field of the variable it predicts.

- **Predictors**: coarse fields of other variables (any number; they need not include the
  target), from a netCDF/Zarr file on their own grid, taken at the target's times and
  interpolated (linearly) to the target's input grid.
- **Static fields**: high-resolution fields on the target's grid (elevation, land–sea mask), from
  a netCDF/Zarr file; each ``scale × scale`` block's values become ``scale²`` input channels
  (space to depth: nothing is averaged away).
- **Derived**: ``position`` (latitude / 90, and the sine and cosine of longitude, at each input
  cell's centre) and ``season`` (the sine and cosine of the time of year, from the time
  coordinate).

All of them become extra channels of the model's input, after the target's own coarse channels:
``lr [N, C + K, h, w]`` with ``K = len(names)`` (``Covariates.names``, saved in the model's
config as ``PipelineConfig.covariates``). The mean model uses them as regressors and the
denoiser as conditioning (``model.pipeline``); ``sample`` and ``evaluate`` rebuild them from the same
request and check the names. A missing, mis-gridded or mis-timed covariate is a one-line error
naming it and the expected grid or times.

>>> spec = CovariateSpec(predictors=("predictors.nc", ["vwnd"]), static=("static.nc", ["elevation"]),
...                      position=True, season=True)                         # doctest: +SKIP
>>> cov = load_covariates(spec, dataset.grid, scale=4)                       # doctest: +SKIP
>>> cov.values.shape, cov.names[:3]                                          # doctest: +SKIP
(torch.Size([132, 1 + 16 + 3 + 2, 18, 36]), ['vwnd', 'elevation[0,0]', 'elevation[0,1]'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from podiff.data.fields import Grid, coarsen_axis


@dataclass
class CovariateSpec:
    """What a request asks for: ``predictors`` and ``static`` as ``(file, [variable, ...])`` (or
    None), and the derived ``position`` and ``season``."""

    predictors: tuple[str, list[str]] | None = None
    static: tuple[str, list[str]] | None = None
    position: bool = False
    season: bool = False

    def __post_init__(self):
        for name in ("predictors", "static"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or not value[1]:
                raise ValueError(f"{name} must be (file, [variable, ...]) with at least one variable; got {value!r}")
            setattr(self, name, (str(value[0]), [str(v) for v in value[1]]))

    @property
    def empty(self) -> bool:
        return self.predictors is None and self.static is None and not self.position and not self.season


@dataclass
class Covariates:
    """Covariate channels ``values [N, K, h, w]`` on the input grid and their ``names`` (K)."""

    values: torch.Tensor
    names: list[str] = field(default_factory=list)


def _open(path: str, label: str):
    from podiff.data.fields import _open_dataset

    if not Path(path).exists():
        raise FileNotFoundError(f"{label}: no file at {path}")
    return _open_dataset(path)


def _variable(ds, name: str, path: str, label: str):
    if name not in ds.data_vars:
        raise ValueError(f"{label} {path}: no variable {name!r} (variables: {sorted(map(str, ds.data_vars))})")
    return ds[name]


def _dims(da, label: str) -> tuple[str | None, str, str]:
    from podiff.data.fields import _grid_dims

    y, x = _grid_dims(da, None, label)
    others = [str(d) for d in da.dims if d not in (y, x)]
    if len(others) > 1:
        raise ValueError(f"{label}: dimensions {list(map(str, da.dims))}; expected (time, y, x) or (y, x)")
    return (others[0] if others else None), y, x


def _same_axis(values, expected: np.ndarray) -> bool:
    values = np.asarray(values, dtype=np.float64)
    tolerance = 1e-6 * (1 + np.abs(expected).max())
    return values.shape == expected.shape and np.allclose(values, expected, rtol=0, atol=tolerance)


def _span(values) -> str:
    v = np.asarray(values)
    return f"{len(v)} values {v[0]:g}…{v[-1]:g}"


def _times(grid: Grid, label: str) -> np.ndarray:
    values = np.asarray(grid.sample.values)
    if values.dtype.kind != "M":
        raise ValueError(f"{label}: the target's fields have no time coordinate (sample axis {grid.sample.name!r}); "
                         f"predictors and season need one")
    return values


def predictors(path: str, names: list[str], grid: Grid, scale: int) -> Covariates:
    """Each variable at the target's times, interpolated to the target's input grid."""
    label = f"--predictors {path}"
    ds = _open(path, label)
    times = _times(grid, label)
    lat, lon = coarsen_axis(grid.y, scale).values, coarsen_axis(grid.x, scale).values
    out = []
    for name in names:
        da = _variable(ds, name, path, label)
        tdim, y, x = _dims(da, f"{label}: variable {name!r}")
        if tdim is None:
            raise ValueError(f"{label}: variable {name!r} has no time dimension; a static field goes in --static")
        have = np.asarray(da[tdim].values) if tdim in da.coords else None
        if have is None or have.dtype.kind != "M":
            raise ValueError(f"{label}: variable {name!r} has no time coordinate on {tdim!r}")
        missing = np.setdiff1d(times, have)
        if missing.size:
            raise ValueError(f"{label}: variable {name!r} has no field at {missing.size} of the target's "
                             f"{len(times)} times (first missing: {np.datetime_as_string(missing[0], unit='D')}; "
                             f"it holds {np.datetime_as_string(have[0], unit='D')}…"
                             f"{np.datetime_as_string(have[-1], unit='D')})")
        da = da.sel({tdim: times})
        ys, xs = np.asarray(da[y].values, dtype=np.float64), np.asarray(da[x].values, dtype=np.float64)
        if not (_within(lat, ys) and _within(lon, xs)):
            raise ValueError(f"{label}: variable {name!r} on {y} {_span(ys)}, {x} {_span(xs)} does not cover the "
                             f"target's input grid ({_span(lat)}, {_span(lon)})")
        if not (_same_axis(ys, lat) and _same_axis(xs, lon)):
            da = da.interp({y: lat, x: lon})
        values = np.asarray(da.transpose(tdim, y, x).values, dtype=np.float32)
        out.append(torch.from_numpy(values))
    return Covariates(torch.stack(out, 1), list(names))


def _within(target: np.ndarray, have: np.ndarray) -> bool:
    lo, hi = min(have[0], have[-1]), max(have[0], have[-1])
    return bool(target.min() >= lo - 1e-9 and target.max() <= hi + 1e-9)


def static(path: str, names: list[str], grid: Grid, scale: int, n: int) -> Covariates:
    """Each 2-D variable on the target's high-resolution grid, as ``scale²`` block channels."""
    label = f"--static {path}"
    ds = _open(path, label)
    H, W = len(grid.y.values) // scale * scale, len(grid.x.values) // scale * scale
    ys, xs = np.asarray(grid.y.values, dtype=np.float64)[:H], np.asarray(grid.x.values, dtype=np.float64)[:W]
    channels, labels = [], []
    for name in names:
        da = _variable(ds, name, path, label)
        tdim, y, x = _dims(da, f"{label}: variable {name!r}")
        if tdim is not None:
            raise ValueError(f"{label}: variable {name!r} has a {tdim!r} dimension; a static field is 2-D (y, x)")
        have_y, have_x = np.asarray(da[y].values, dtype=np.float64), np.asarray(da[x].values, dtype=np.float64)
        if len(have_y) >= H and len(have_x) >= W:
            have_y, have_x, da = have_y[:H], have_x[:W], da.isel({y: slice(0, H), x: slice(0, W)})
        if not (_same_axis(have_y, ys) and _same_axis(have_x, xs)):
            raise ValueError(f"{label}: variable {name!r} is on {y} {_span(have_y)}, {x} {_span(have_x)}; the "
                             f"target's grid is {grid.y.name} {_span(ys)}, {grid.x.name} {_span(xs)}")
        values = torch.from_numpy(np.asarray(da.transpose(y, x).values, dtype=np.float32))
        blocks = values.view(H // scale, scale, W // scale, scale).permute(1, 3, 0, 2).reshape(scale * scale,
                                                                                             H // scale, W // scale)
        channels.append(blocks)
        labels += [f"{name}[{i},{j}]" for i in range(scale) for j in range(scale)]
    # One copy, viewed by every field (stride 0): a streamed archive does not hold it per field.
    return Covariates(torch.cat(channels)[None].expand(n, -1, -1, -1), labels)


def position(grid: Grid, scale: int, n: int) -> Covariates:
    """latitude / 90 and the sine and cosine of longitude at each input cell's centre."""
    lat = np.asarray(coarsen_axis(grid.y, scale).values, dtype=np.float64)
    lon = np.deg2rad(np.asarray(coarsen_axis(grid.x, scale).values, dtype=np.float64))
    if not (np.abs(lat).max() <= 90):
        raise ValueError(f"--position: the target's {grid.y.name!r} coordinate ({_span(lat)}) is not a latitude "
                         f"in degrees")
    la, lo = np.meshgrid(lat / 90, lon, indexing="ij")
    values = torch.from_numpy(np.stack([la, np.sin(lo), np.cos(lo)]).astype(np.float32))
    return Covariates(values[None].expand(n, -1, -1, -1), ["latitude", "sin longitude", "cos longitude"])


def season(grid: Grid, scale: int, size: tuple[int, int]) -> Covariates:
    """The sine and cosine of the time of year (day of year / 365.25) of each field."""
    times = _times(grid, "--season")
    day = (times - times.astype("datetime64[Y]")).astype("timedelta64[s]").astype(np.float64) / 86400.0
    angle = 2 * np.pi * day / 365.25
    values = torch.from_numpy(np.stack([np.sin(angle), np.cos(angle)], 1).astype(np.float32))
    return Covariates(values[:, :, None, None].expand(-1, -1, *size), ["sin season", "cos season"])


def covariate_parts(spec: CovariateSpec, grid: Grid | None, scale: int) -> list[Covariates]:
    """The covariates ``spec`` asks for, for the fields of ``grid`` (the target's coordinates), one
    ``Covariates`` per kind (predictors, static, position, season); the static ones and position
    are views of one copy over every field, so the parts of a long archive stay small (a streamed
    archive reads the fields it needs with ``take``)."""
    if grid is None:
        raise ValueError("covariates need the target's coordinates: a netCDF/Zarr file or the packaged SST "
                         "(an .npz, the MRI and the images have none)")
    n = len(grid.sample.values)
    h, w = len(grid.y.values) // scale, len(grid.x.values) // scale
    parts = []
    if spec.predictors is not None:
        parts.append(predictors(*spec.predictors, grid, scale))
    if spec.static is not None:
        parts.append(static(*spec.static, grid, scale, n))
    if spec.position:
        parts.append(position(grid, scale, n))
    if spec.season:
        parts.append(season(grid, scale, (h, w)))
    return parts


def take(parts: list[Covariates], samples) -> torch.Tensor:
    """The covariate channels ``[B, K, h, w]`` of the fields ``samples`` (indices into the grid's
    samples, any order), from ``covariate_parts``."""
    rows = torch.as_tensor(np.asarray(samples, dtype=np.int64))
    return torch.cat([p.values[rows] for p in parts], 1)


def load_covariates(spec: CovariateSpec, grid: Grid | None, scale: int) -> Covariates:
    """The covariates ``spec`` asks for, for the fields of ``grid`` (the target's coordinates)."""
    parts = covariate_parts(spec, grid, scale)
    if not parts:
        h, w = len(grid.y.values) // scale, len(grid.x.values) // scale
        return Covariates(torch.zeros(len(grid.sample.values), 0, h, w), [])
    return Covariates(torch.cat([p.values for p in parts], 1), [name for p in parts for name in p.names])


def attach(dataset, covariates: Covariates):
    """The dataset with its input ``lr [N, C, h, w]`` extended by the covariate channels."""
    from dataclasses import replace

    if covariates.values.shape[0] != dataset.lr.shape[0] or tuple(covariates.values.shape[-2:]) != tuple(
            dataset.lr.shape[-2:]):
        raise ValueError(f"covariates [{', '.join(map(str, covariates.values.shape))}] do not fit the input "
                         f"[{', '.join(map(str, dataset.lr.shape))}]")
    if not covariates.names:
        return dataset
    lr = torch.cat([dataset.lr, covariates.values.to(dataset.lr)], 1)
    return replace(dataset, lr=lr, meta={**dataset.meta, "covariates": list(covariates.names)})


__all__ = ["CovariateSpec", "Covariates", "attach", "covariate_parts", "load_covariates", "position", "predictors",
           "season", "static", "take"]
