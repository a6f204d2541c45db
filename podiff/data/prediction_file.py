"""The prediction file ``podiff sample`` writes and ``podiff evaluate`` reads: ``.nc``, ``.zarr`` or ``.npz``.

netCDF / Zarr (``write_prediction(path, prediction)``) hold an ``xr.Dataset`` a scientist opens
with ``xr.open_dataset`` and plots at once:

- ``mean``, ``std`` (and ``variance`` if asked) ``(sample, [channel,] y, x)`` on the
  high-resolution grid; ``members`` ``(member, sample, [channel,] y, x)`` if stored;
- ``input`` on the low-resolution grid ``(sample, [channel,] y_lr, x_lr)``; ``truth`` where the
  data has it; ``sample_index``: the samples' positions in the data file;
- the data's coordinates (high-resolution ones exact, low-resolution ones their block means, or
  the reverse when only the low-resolution field was given), the variable's ``units`` and long
  name, and global attributes: the model, seed, sampler steps, scale, member count, podiff and
  torch versions, CF ``Conventions``. Masked points are NaN, written with a ``_FillValue``.

``.npz`` keeps the arrays under the same names (without coordinates) and is read back the same.
``read_prediction(path)`` returns a ``Prediction`` for either. Writes are atomic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from podiff.core.io import atomic_directory, atomic_write
from podiff.data.fields import Axis, Grid, _xarray, coarsen_axis, one_line, sniff

FILL_VALUE = np.float32(9.969209968386869e36)  # the netCDF default fill for float
CONVENTIONS = "CF-1.8"
FORMATS = {".nc": "netcdf", ".nc4": "netcdf", ".zarr": "zarr", ".npz": "npz"}


@dataclass
class Prediction:
    """An ensemble prediction and where it came from.

    ``mean``, ``variance`` ``[N, C, H, W]``; ``members`` ``[M, N, C, H, W]`` or None; ``lr``
    ``[N, C, h, w]`` or None; ``truth`` like ``mean`` or None; ``indices`` ``[N]`` positions in the
    data; ``attrs``: model, data, split, seed, steps, scale, num_samples, seconds, versions,
    ``error_quantiles`` (the predictive's shape, ``podiff.evaluation.error_shape``; empty: Gaussian) and
    ``error_band_edges`` (one shape per band of the mean; empty: one shape);
    ``grid``: the high-resolution grid or None.
    """

    mean: np.ndarray
    variance: np.ndarray
    indices: np.ndarray
    attrs: dict
    members: np.ndarray | None = None
    lr: np.ndarray | None = None
    truth: np.ndarray | None = None
    grid: Grid | None = None
    extra: dict = field(default_factory=dict)


REQUIRED_ATTRS = ("model", "data", "split", "num_samples", "steps", "scale")


def output_format(path: str | Path) -> str:
    """``netcdf`` | ``zarr`` | ``npz`` by the output's suffix; anything else is an error."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {path}: the prediction file must end in .nc, .zarr or .npz; got {suffix!r}")
    return FORMATS[suffix]


def _axes(pred: Prediction, H: int, W: int, scale: int):
    """High- and low-resolution (y, x) axes and the sample axis."""
    grid = pred.grid
    if grid is None:
        y, x = Axis("y", np.arange(H, dtype=np.float64)), Axis("x", np.arange(W, dtype=np.float64))
        sample = Axis("sample", np.asarray(pred.indices))
    else:
        y, x, sample = grid.y, grid.x, grid.sample
    return sample, y, x, coarsen_axis(y, scale), coarsen_axis(x, scale)


def to_xarray(pred: Prediction):
    """The ``xr.Dataset`` of a prediction (see the module docstring)."""
    xr = _xarray()
    N, C, H, W = pred.mean.shape
    scale = int(pred.attrs["scale"])
    sample, y, x, y_lr, x_lr = _axes(pred, H, W, scale)
    lead = (sample.name,) + (("channel",) if C > 1 else ())
    hr_dims, lr_dims = lead + (y.name, x.name), lead + (y_lr.name, x_lr.name)

    def squeeze(a):
        return a if C > 1 else a[..., 0, :, :]

    var_attrs = dict(pred.grid.attrs) if pred.grid is not None else {}
    units = var_attrs.get("units")
    name = var_attrs.get("long_name") or var_attrs.get("standard_name") or (pred.grid.var if pred.grid else "field")
    with_units = {"units": units} if units else {}
    data_vars = {
        "mean": (hr_dims, squeeze(pred.mean), {"long_name": f"ensemble mean of {name}", **with_units}),
        "std": (hr_dims, squeeze(np.sqrt(np.maximum(pred.variance, 0))),
                {"long_name": f"predictive standard deviation of {name}", **with_units}),
        "sample_index": ((sample.name,), np.asarray(pred.indices, dtype=np.int64),
                         {"long_name": "position of the sample in the data file"}),
    }
    if pred.extra.get("write_variance"):
        var_units = {"units": f"({units})^2"} if units else {}
        data_vars["variance"] = (hr_dims, squeeze(pred.variance), {"long_name": f"predictive variance of {name}",
                                                                   **var_units})
    if pred.members is not None:
        data_vars["members"] = (("member",) + hr_dims, pred.members if C > 1 else pred.members[..., 0, :, :],
                                {"long_name": f"ensemble members of {name}", **with_units})
    if pred.lr is not None:
        data_vars["input"] = (lr_dims, squeeze(pred.lr), {"long_name": f"low-resolution input ({name}, "
                                                                      f"{scale}x coarser)", **with_units})
    if pred.truth is not None:
        data_vars["truth"] = (hr_dims, squeeze(pred.truth), {"long_name": f"{name} (truth)", **with_units})
    coords = {sample.name: (sample.name, sample.values, sample.attrs), y.name: (y.name, y.values, y.attrs),
              x.name: (x.name, x.values, x.attrs), y_lr.name: (y_lr.name, y_lr.values, y_lr.attrs),
              x_lr.name: (x_lr.name, x_lr.values, x_lr.attrs)}
    if C > 1:
        channels = pred.grid.channels if pred.grid is not None else [str(c) for c in range(C)]
        coords["channel"] = ("channel", np.asarray(channels, dtype=str))
    if pred.members is not None:
        coords["member"] = ("member", np.arange(pred.members.shape[0]))
    attrs = {"Conventions": CONVENTIONS, "title": f"podiff ensemble super-resolution of {name}",
             "source": f"podiff {pred.attrs.get('podiff_version', '')}".strip(),
             "references": "patchwise-POD latent diffusion; mean and std in closed form from the latent moments"}
    for key, value in pred.attrs.items():
        attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _float_encoding(ds) -> dict:
    return {name: {"_FillValue": FILL_VALUE, "dtype": "float32"} for name, v in ds.data_vars.items()
            if v.dtype.kind == "f"}


def write_prediction(path: str | Path, pred: Prediction) -> None:
    """Writes ``pred`` to ``path`` (``.nc``, ``.zarr`` or ``.npz``), atomically: a failure leaves
    no partial output (a Zarr store is written beside and renamed into place)."""
    path = Path(path)
    kind = output_format(path)
    if kind == "npz":
        arrays = {"mean": pred.mean, "variance": pred.variance, "indices": np.asarray(pred.indices),
                  "attrs": np.array(json.dumps(pred.attrs))}
        for key in ("members", "lr", "truth"):
            if getattr(pred, key) is not None:
                arrays[key] = getattr(pred, key)
        atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))
        return
    ds = to_xarray(pred)
    encoding = _float_encoding(ds)
    if kind == "netcdf":
        atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding))
        return
    with atomic_directory(path) as store:
        ds.to_zarr(store, mode="w", encoding=encoding, consolidated=True, zarr_format=2)  # v2: what most readers open


def read_prediction(path: str | Path) -> Prediction:
    """A ``Prediction`` from a file ``write_prediction`` wrote (``.nc`` / Zarr by content, or
    ``.npz``); a foreign or damaged file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prediction file at {path}")
    kind = sniff(path)
    if kind == "npz":
        return _read_npz(path)
    if kind not in ("netcdf3", "netcdf4", "zarr"):
        raise ValueError(f"{path} is not a readable prediction file (by content neither netCDF, Zarr nor .npz)")
    xr = _xarray()
    try:
        ds = xr.open_zarr(path,
                          consolidated=(path / ".zmetadata").exists()) if kind == "zarr" else xr.open_dataset(path)
        ds = ds.load()
    except Exception as exc:
        raise ValueError(f"{path} is not a readable prediction: {one_line(exc)}") from None
    missing = [k for k in ("mean", "std", "sample_index") if k not in ds] + \
        [k for k in REQUIRED_ATTRS if k not in ds.attrs]
    if missing:
        raise ValueError(f"{path} is not a podiff prediction (missing {missing})")
    mean_da = ds["mean"]
    sample_dim, y_name, x_name = mean_da.dims[0], mean_da.dims[-2], mean_da.dims[-1]
    has_channel = "channel" in mean_da.dims

    def nchw(name):
        if name not in ds:
            return None
        a = np.asarray(ds[name].values, dtype=np.float32)
        return a if has_channel else np.expand_dims(a, -3)

    variance = nchw("variance")
    if variance is None:
        variance = nchw("std") ** 2
    attrs = {}
    for key, value in ds.attrs.items():
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        attrs[key] = value.item() if isinstance(value, np.generic) else value
    coord_attrs = {k: v for k, v in mean_da.attrs.items() if k == "units"}
    channels = [str(c) for c in ds["channel"].values] if has_channel else [attrs.get("var", "field")]
    grid = Grid(Axis(sample_dim, ds[sample_dim].values, dict(ds[sample_dim].attrs)),
                Axis(y_name, ds[y_name].values, dict(ds[y_name].attrs)),
                Axis(x_name, ds[x_name].values, dict(ds[x_name].attrs)), channels, coord_attrs, str(path),
                str(attrs.get("var", "field")))
    return Prediction(nchw("mean"), variance, np.asarray(ds["sample_index"].values), attrs,
                      members=nchw("members"), lr=nchw("input"), truth=nchw("truth"), grid=grid)


def _read_npz(path: Path) -> Prediction:
    try:
        archive = dict(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable prediction .npz: {exc}") from None
    if "attrs" not in archive:  # the older layout: one array per attribute
        missing = {"mean", "variance", "indices", "split", "model"} - set(archive)
        if missing:
            raise ValueError(f"{path} is not a podiff prediction (missing {sorted(missing)})")
        attrs = {"model": str(archive["model"]), "split": str(archive["split"]),
                 "data": str(archive.get("data", "")), "num_samples": int(archive["num_samples"]),
                 "seconds": float(archive.get("seconds", np.nan)), "steps": int(archive.get("steps", 0))}
    else:
        missing = {"mean", "variance", "indices"} - set(archive)
        if missing:
            raise ValueError(f"{path} is not a podiff prediction (missing {sorted(missing)})")
        attrs = json.loads(str(archive["attrs"]))
    return Prediction(archive["mean"], archive["variance"], archive["indices"], attrs,
                      members=archive.get("members"), lr=archive.get("lr"), truth=archive.get("truth"))


__all__ = ["Prediction", "write_prediction", "read_prediction", "to_xarray", "output_format", "FILL_VALUE"]
