"""Where and when the model fails: per-location and per-time scores as a netCDF beside the report.

``metric_maps(mean, variance, truth, members)`` reduces the pixelwise scores (NaN-aware):

- over samples, per location ``[C, H, W]``: ``rmse_map``, ``crps_map`` (the members' fair CRPS,
  or the Gaussian CRPS of ``(mean, variance)`` without members), ``spread_map`` (mean predictive
  std), ``bias_map`` (mean − truth);
- over locations, per sample ``[N, C]``: ``rmse_time``, ``crps_time``, ``spread_time``.

``write_metric_maps(path, ...)`` writes them with the data's coordinates (``Grid``), atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from podiff.core.io import atomic_write
from podiff.evaluation import error_shape, metrics


def _nanmean(x: torch.Tensor, dims) -> torch.Tensor:
    valid = ~torch.isnan(x)
    total = torch.where(valid, x, 0.0).sum(dims)
    count = valid.sum(dims)
    return torch.where(count > 0, total / count.clamp_min(1), float("nan"))


def metric_maps(mean: torch.Tensor, variance: torch.Tensor, truth: torch.Tensor,
                members: torch.Tensor | None = None, error_quantiles=None,
                band_edges=None) -> dict[str, torch.Tensor]:
    """Scores per location (``[C, H, W]``) and per sample (``[N, C]``) in float64; NaN where no
    pixel is valid. ``mean``, ``variance``, ``truth`` ``[N, C, H, W]``; ``members`` ``[M, N, C, H, W]``.
    The CRPS is the members' (fair) when there are members, else that of the closed form with the
    shape ``error_quantiles`` (``podiff.evaluation.error_shape``; None: Gaussian; one per band of the mean with
    ``band_edges``)."""
    if mean.shape != truth.shape or variance.shape != truth.shape:
        raise ValueError(f"mean, variance and truth must have one shape; got {tuple(mean.shape)}, "
                         f"{tuple(variance.shape)} and {tuple(truth.shape)}")
    mean, variance, truth = mean.double(), variance.double(), truth.double()
    valid = ~torch.isnan(truth) & ~torch.isnan(mean)
    sq = torch.where(valid, (mean - truth) ** 2, float("nan"))
    err = torch.where(valid, mean - truth, float("nan"))
    if members is not None and members.shape[0] >= 2:
        crps = metrics.crps_ensemble(members.double(), truth, fair=True, reduce=False)
    elif error_quantiles:
        crps = error_shape.crps(mean, variance.clamp_min(0), truth, error_quantiles, reduce=False, edges=band_edges)
    else:
        crps = metrics.crps_gaussian(mean, variance.clamp_min(0), truth, reduce=False)
    crps = torch.where(valid, crps, float("nan"))
    std = torch.where(valid, variance.clamp_min(0).sqrt(), float("nan"))
    return {"rmse_map": _nanmean(sq, 0).sqrt(), "crps_map": _nanmean(crps, 0), "spread_map": _nanmean(std, 0),
            "bias_map": _nanmean(err, 0), "rmse_time": _nanmean(sq, (2, 3)).sqrt(),
            "crps_time": _nanmean(crps, (2, 3)), "spread_time": _nanmean(std, (2, 3))}


LONG_NAMES = {"rmse_map": "RMSE of the ensemble mean over samples", "crps_map": "CRPS over samples",
              "spread_map": "mean predictive standard deviation over samples",
              "bias_map": "mean error (ensemble mean - truth) over samples",
              "rmse_time": "RMSE of the ensemble mean over the grid", "crps_time": "CRPS over the grid",
              "spread_time": "mean predictive standard deviation over the grid"}


def write_metric_maps(path: str | Path, mean, variance, truth, members=None, grid=None,
                      error_quantiles=None, band_edges=None) -> Path | None:
    """Writes ``metric_maps`` as netCDF at ``path`` (coordinates from ``grid`` when given);
    returns the path, or None when xarray / netCDF4 are not installed (the report does not need them)."""
    from podiff.data.fields import netcdf_available

    if not netcdf_available():
        return None
    import xarray as xr

    maps = {k: v.cpu().numpy().astype(np.float32)
            for k, v in metric_maps(mean, variance, truth, members, error_quantiles, band_edges).items()}
    N, C, H, W = truth.shape
    if grid is not None:
        sample, y, x = grid.sample, grid.y, grid.x
    else:
        from podiff.data.fields import Axis

        sample, y, x = Axis("sample", np.arange(N)), Axis("y", np.arange(H)), Axis("x", np.arange(W))
    units = {"units": grid.attrs["units"]} if grid is not None and "units" in grid.attrs else {}
    data_vars = {}
    for key, value in maps.items():
        dims = ("channel", y.name, x.name) if key.endswith("_map") else (sample.name, "channel")
        data_vars[key] = (dims, value, {"long_name": LONG_NAMES[key], **units})
    coords = {sample.name: (sample.name, sample.values, sample.attrs), y.name: (y.name, y.values, y.attrs),
              x.name: (x.name, x.values, x.attrs), "channel": ("channel", np.arange(C))}
    ds = xr.Dataset(data_vars, coords=coords, attrs={"Conventions": "CF-1.8",
                                                     "title": "podiff scores per location and per sample"})
    from podiff.data.prediction_file import FILL_VALUE

    encoding = {k: {"_FillValue": FILL_VALUE} for k in data_vars}
    path = Path(path)
    atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding))
    return path


__all__ = ["metric_maps", "write_metric_maps"]
