"""Gridded fields from netCDF and Zarr, read with xarray, with their coordinates kept.

``open_field(source, var=...)`` opens what ``xr.open_dataset`` opens — a netCDF-3 or netCDF-4
file, a Zarr store, or a glob of netCDF files combined along their sample dimension — recognised
by content, not suffix, and returns a lazy ``xr.DataArray`` with dimensions
``(sample, channel, y, x)`` and its ``Grid``: the coordinates and attributes that outputs carry.
CF decoding is xarray's: ``_FillValue`` / ``missing_value`` become NaN and
``scale_factor`` / ``add_offset`` are applied.

- The grid is the last two dimensions, or the dimensions named like ``lat``/``latitude``/``y``
  and ``lon``/``longitude``/``x``, or ``dims=("y_name", "x_name")``.
- The sample dimension is ``time`` when there is one, else the first other dimension.
- A third non-grid dimension (level, band) becomes the channels; or ``channels=[var, ...]``
  stacks variables as channels.
- ``time="2006-04:2009-12"`` selects a range of the sample coordinate (label-based).

>>> import numpy as np, xarray as xr, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "sst.nc"
>>> xr.Dataset({"sst": (("time", "lat", "lon"), np.ones((3, 4, 8), "f4"))},
...            coords={"lat": np.arange(4.0), "lon": np.arange(8.0)}).to_netcdf(path)
>>> field, grid = open_field(path, var="sst")
>>> field.dims, grid.y.name, grid.x.values.tolist()[:3]
(('time', 'channel', 'lat', 'lon'), 'lat', [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import glob as globbing
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from podiff.core.dependencies import require

Y_NAMES = ("lat", "latitude", "y", "rlat", "nav_lat", "south_north")
X_NAMES = ("lon", "longitude", "x", "rlon", "nav_lon", "west_east")
SAMPLE_NAMES = ("time", "t", "sample", "member_time")

NETCDF3_MAGIC = (b"CDF\x01", b"CDF\x02", b"CDF\x05")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


def sniff(path: str | Path) -> str | None:
    """The format of ``path`` by its content: ``"npz"``, ``"netcdf3"``, ``"netcdf4"`` (HDF5),
    ``"zarr"`` (a store directory), ``"glob"`` (a pattern), or None (not one of those)."""
    text = str(path)
    if any(ch in text for ch in "*?[") and not Path(text).exists():
        return "glob"
    path = Path(path)
    if path.is_dir():
        if any((path / marker).exists() for marker in (".zgroup", ".zarray", "zarr.json", ".zmetadata")):
            return "zarr"
        return None
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] in NETCDF3_MAGIC:
        return "netcdf3"
    if head == HDF5_MAGIC:
        return "netcdf4"
    if head[:4] == ZIP_MAGIC:
        return "npz"
    return None


@dataclass
class Axis:
    """One coordinate: its dimension name, values and attributes (units, long name, …)."""

    name: str
    values: np.ndarray
    attrs: dict = field(default_factory=dict)

    def take(self, index) -> Axis:
        return Axis(self.name, np.asarray(self.values)[index], dict(self.attrs))


@dataclass
class Grid:
    """Where a field lives: ``sample`` (time), ``y`` and ``x`` axes at the data's resolution,
    channel names, the variable's attributes and the file it came from."""

    sample: Axis
    y: Axis
    x: Axis
    channels: list[str]
    attrs: dict
    source: str
    var: str
    bounds: tuple | None = None  # (lo, hi) from CF valid_min / valid_max / valid_range (declared_bounds)

    def take(self, index) -> Grid:
        """The grid of the samples ``index`` (an index array, in order)."""
        return replace(self, sample=self.sample.take(index))

    def crop(self, H: int, W: int) -> Grid:
        """The grid of the first ``H × W`` points (a field cropped to a multiple of the scale)."""
        return replace(self, y=self.y.take(slice(0, H)), x=self.x.take(slice(0, W)))


def coarsen_axis(axis: Axis, scale: int) -> Axis:
    """Block means of ``scale`` consecutive coordinate values (numeric coordinates; an index
    axis stays an index)."""
    values = np.asarray(axis.values)
    n = len(values) // scale
    if values.dtype.kind in "fiu":
        coarse = values[: n * scale].astype(np.float64).reshape(n, scale).mean(1)
    else:
        coarse = np.arange(n)
    return Axis(f"{axis.name}_lr", coarse, dict(axis.attrs))


def refine_axis(axis: Axis, scale: int, name: str | None = None) -> Axis:
    """High-resolution centres from low-resolution ones: each coarse cell (edges halfway between
    neighbouring centres, the outer ones mirrored) split into ``scale`` equal cells. On a regular
    grid this is exact, and ``coarsen_axis`` of the result gives ``axis`` back."""
    c = np.asarray(axis.values, dtype=np.float64)
    if len(c) == 1:
        raise ValueError(f"coordinate {axis.name!r} has one value; its spacing is unknown")
    edges = np.empty(len(c) + 1)
    edges[1:-1] = 0.5 * (c[1:] + c[:-1])
    edges[0] = c[0] - (edges[1] - c[0])
    edges[-1] = c[-1] + (c[-1] - edges[-2])
    frac = (np.arange(scale) + 0.5) / scale
    fine = (edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * frac[None, :]).ravel()
    return Axis(name or axis.name.removesuffix("_lr"), fine, dict(axis.attrs))


def _xarray():
    return require("xarray", "reading netCDF / Zarr")


def _open_dataset(source: str | Path):
    """The ``xr.Dataset`` at ``source``, lazily (dask chunks), CF-decoded."""
    xr = _xarray()
    kind = sniff(source)
    label = str(source)
    if kind == "glob":
        files = sorted(globbing.glob(label))
        if not files:
            raise FileNotFoundError(f"no files match {label}")
        bad = [f for f in files if sniff(f) not in ("netcdf3", "netcdf4")]
        if bad:
            raise ValueError(f"{bad[0]} (matched by {label}) is not a netCDF file")
        try:
            ds = xr.open_mfdataset(files, combine="by_coords", chunks={}, data_vars="minimal", coords="minimal",
                                   compat="override", join="exact")
        except Exception as exc:
            raise ValueError(f"{label}: the files do not combine into one dataset: {one_line(exc)}") from None
        return ds
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    if kind is None:
        raise ValueError(f"{path} is not a netCDF file, a Zarr store or an .npz archive (read by content)")
    if kind == "npz":
        raise ValueError(f"{path} is an .npz archive, not a netCDF/Zarr dataset")
    # netCDF-3 classic: scipy reads it too, without the netCDF C library.
    engine = kind if kind in ("zarr", "netcdf4") else ("netcdf4" if _has("netCDF4") else "scipy")
    try:
        extra = {"consolidated": (path / ".zmetadata").exists()} if kind == "zarr" else {}
        ds = xr.open_dataset(path, engine=engine, chunks={}, **extra)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable {kind} dataset: {one_line(exc)}") from None
    return ds


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def netcdf_available() -> bool:
    """Whether xarray and the netCDF4 engine are installed (the ``data`` extra)."""
    return _has("xarray") and _has("netCDF4")


def _plain_attrs(attrs) -> dict:
    """The attributes a netCDF file can hold as they are (strings and numbers)."""
    return {k: v for k, v in attrs.items() if isinstance(v, (str, int, float))}


def declared_bounds(da) -> tuple | None:
    """``(lo, hi)`` (either None) from a variable's CF ``valid_range`` or ``valid_min`` /
    ``valid_max`` attributes, unpacked with its ``scale_factor`` / ``add_offset`` (CF gives them in
    packed units); None when it declares none."""
    attrs = dict(da.attrs)
    lo = hi = None
    if "valid_range" in attrs:
        values = np.asarray(attrs["valid_range"], dtype=np.float64).ravel()
        if values.size == 2:
            lo, hi = float(values[0]), float(values[1])
    lo = float(np.asarray(attrs["valid_min"], dtype=np.float64).ravel()[0]) if "valid_min" in attrs else lo
    hi = float(np.asarray(attrs["valid_max"], dtype=np.float64).ravel()[0]) if "valid_max" in attrs else hi
    if lo is None and hi is None:
        return None
    packing = {**dict(getattr(da, "encoding", {})), **attrs}
    factor, offset = float(packing.get("scale_factor", 1.0)), float(packing.get("add_offset", 0.0))
    lo, hi = (None if b is None else b * factor + offset for b in (lo, hi))
    if factor < 0:
        lo, hi = hi, lo
    if not all(b is None or np.isfinite(b) for b in (lo, hi)) or (lo is not None and hi is not None and lo >= hi):
        return None
    return lo, hi


def one_line(exc: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _field_variables(ds) -> list[str]:
    return sorted(str(name) for name, v in ds.data_vars.items() if v.ndim >= 2)


def _grid_dims(da, dims, label: str) -> tuple[str, str]:
    names = [str(d) for d in da.dims]
    if dims is not None:
        if len(dims) != 2:
            raise ValueError(f"dims must name the grid's two dimensions (y, x); got {dims!r}")
        missing = [d for d in dims if d not in names]
        if missing:
            raise ValueError(f"{label} has no dimension {missing[0]!r} (dimensions: {names})")
        return str(dims[0]), str(dims[1])
    lower = {n.lower(): n for n in names}
    y = next((lower[n] for n in Y_NAMES if n in lower), None)
    x = next((lower[n] for n in X_NAMES if n in lower), None)
    if y is not None and x is not None:
        return y, x
    if len(names) < 2:
        raise ValueError(f"{label} has {len(names)} dimension(s) {names}; a field needs a 2-D grid")
    return names[-2], names[-1]


def _check_axis(da, name: str, label: str) -> Axis:
    if name in da.coords:
        coord = da.coords[name]
        values = np.asarray(coord.values)
        attrs = _plain_attrs(coord.attrs)
    else:
        values, attrs = np.arange(da.sizes[name]), {}
    if values.ndim != 1:
        raise ValueError(f"{label}: coordinate {name!r} is {values.ndim}-D; a 1-D axis is expected")
    if values.dtype.kind in "fiuM" and len(values) > 1:
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"{label}: coordinate {name!r} has NaN or infinite values")
        step = np.diff(values.astype(np.float64) if values.dtype.kind != "M" else values.astype("int64"))
        if not ((step > 0).all() or (step < 0).all()):
            what = "duplicated values" if (step == 0).any() else "values that are not monotonic"
            raise ValueError(f"{label}: coordinate {name!r} has {what}; expected a strictly monotonic axis")
    return Axis(name, values, attrs)


def _time_slice(text: str):
    if ":" not in text:
        return text
    start, stop = text.split(":", 1)
    return slice(start or None, stop or None)


def open_field(source: str | Path, var: str | None = None, *, dims=None, channels=None, time: str | None = None):
    """``(field, grid)``: the variable ``var`` (or the ``channels`` variables stacked) as a lazy
    ``xr.DataArray`` with dimensions ``(sample, "channel", y, x)``, float32, NaN where masked.

    Errors (one line, ``ValueError`` / ``FileNotFoundError``) name the file, the variable and what
    was expected: a missing variable lists the variables there are.
    """
    ds = _open_dataset(source)
    label = str(source)
    names = list(channels) if channels else ([var] if var else [])
    candidates = _field_variables(ds)
    if not names:
        if not candidates:
            found = sorted(str(n) for n in ds.data_vars)
            raise ValueError(f"{label} holds no gridded variable (a field needs at least 2 dimensions; "
                             f"variables: {found})")
        if len(candidates) != 1:
            raise ValueError(f"{label} holds {len(candidates)} gridded variables {candidates}; "
                             f"choose one with --var NAME")
        names = candidates
    for name in names:
        if name not in ds.data_vars:
            raise ValueError(f"{label} has no variable {name!r} (variables: {candidates})")
    arrays = [ds[name] for name in names]
    first = arrays[0]
    for name, a in zip(names[1:], arrays[1:], strict=False):
        if a.dims != first.dims or a.shape != first.shape:
            raise ValueError(f"{label}: channel variable {name!r} has dimensions {dict(a.sizes)}, "
                             f"not {dict(first.sizes)} like {names[0]!r}")
    vlabel = f"{label}: variable {names[0]!r}"
    if first.dtype.kind not in "fiub":
        raise ValueError(f"{vlabel} holds {first.dtype}, not numbers")
    y, x = _grid_dims(first, dims, vlabel)
    rest = [str(d) for d in first.dims if d not in (y, x)]
    sample = next((d for d in rest if d.lower() in SAMPLE_NAMES), rest[0] if rest else None)
    others = [d for d in rest if d != sample]
    if len(names) > 1 and others:
        raise ValueError(f"{vlabel}: with --channels each variable must be (sample, y, x); "
                         f"it also has {others}")
    if len(others) > 1:
        raise ValueError(f"{vlabel} has dimensions {list(first.dims)}: expected (sample, [channel,] {y}, {x})")
    if sample is None:
        arrays = [a.expand_dims("sample") for a in arrays]
        sample = "sample"
    if time is not None:
        if sample not in ds.coords:
            raise ValueError(f"{label}: --time needs a coordinate on the sample dimension {sample!r}")
        try:
            arrays = [a.sel({sample: _time_slice(time)}) for a in arrays]
        except Exception as exc:
            raise ValueError(f"{label}: --time {time!r} does not select from {sample!r}: {one_line(exc)}") from None
    if others:
        channel_dim = others[0]
        field_ = arrays[0].transpose(sample, channel_dim, y, x).rename({channel_dim: "channel"})
        channel_names = [f"{channel_dim}={v}" for v in np.asarray(field_["channel"].values)] \
            if "channel" in field_.coords else [f"{channel_dim}={i}" for i in range(field_.sizes["channel"])]
        field_ = field_.drop_vars("channel", errors="ignore")
    else:
        xr = _xarray()
        field_ = xr.concat([a.transpose(sample, y, x) for a in arrays], dim="channel", coords="minimal",
                           compat="override").transpose(sample, "channel", y, x)
        channel_names = names
    if field_.sizes[sample] == 0:
        raise ValueError(f"{vlabel} holds no samples" + (f" in --time {time}" if time else ""))
    if 0 in field_.shape:
        raise ValueError(f"{vlabel} holds no data; got dimensions {dict(field_.sizes)}")
    grid = Grid(_check_axis(field_, sample, vlabel), _check_axis(field_, y, vlabel), _check_axis(field_, x, vlabel),
                channel_names, _plain_attrs(first.attrs), label, ",".join(names),
                declared_bounds(first) if len(names) == 1 else None)
    return field_.astype(np.float32), grid


__all__ = ["Axis", "Grid", "declared_bounds", "open_field", "sniff", "coarsen_axis", "refine_axis", "netcdf_available",
           "one_line",
           "Y_NAMES", "X_NAMES"]
