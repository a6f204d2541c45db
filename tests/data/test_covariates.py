"""Covariates (``data.covariates``): predictors at the target's times interpolated to its input grid
(against scipy), static fields as block channels, position and season; one-line errors naming the
covariate and the expected grid or times; and a model that uses them where they matter."""

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator

xr = pytest.importorskip("xarray")
pytest.importorskip("netCDF4")

from podiff.data.covariates import CovariateSpec, attach, load_covariates  # noqa: E402
from podiff.data.datasets import load  # noqa: E402

SCALE = 2


def _times(n, start="2000-01-15"):
    return np.array([np.datetime64(start) + np.timedelta64(30 * i, "D") for i in range(n)])


def target(tmp_path, n=12):
    lat, lon = np.linspace(-10, 10, 8), np.linspace(100, 130, 12)
    values = np.random.default_rng(0).standard_normal((n, 8, 12)).astype(np.float32)
    ds = xr.Dataset({"t": (("time", "lat", "lon"), values)}, coords={"time": _times(n), "lat": lat, "lon": lon})
    ds.to_netcdf(tmp_path / "target.nc")
    return load(str(tmp_path / "target.nc"), SCALE, "t")


def predictor_file(tmp_path, n=14, name="p.nc"):
    lat, lon = np.linspace(-12, 12, 7), np.linspace(95, 135, 9)  # its own, coarser grid
    values = np.random.default_rng(1).standard_normal((n, 7, 9)).astype(np.float32)
    ds = xr.Dataset({"u": (("time", "lat", "lon"), values)}, coords={"time": _times(n, "1999-11-16"), "lat": lat,
                                                                     "lon": lon})
    ds.to_netcdf(tmp_path / name)
    return ds


def test_predictors_are_taken_at_the_targets_times_and_interpolated_to_its_input_grid(tmp_path):
    data = target(tmp_path)
    raw = predictor_file(tmp_path)
    cov = load_covariates(CovariateSpec(predictors=(str(tmp_path / "p.nc"), ["u"])), data.grid, SCALE)
    assert cov.names == ["u"] and cov.values.shape == (12, 1, 4, 6)
    lat_lr = data.grid.y.values.reshape(4, 2).mean(1)
    lon_lr = data.grid.x.values.reshape(6, 2).mean(1)
    for i, time in enumerate(data.grid.sample.values):
        k = int(np.nonzero(raw["time"].values == time)[0][0])  # the predictor file starts two months earlier
        f = RegularGridInterpolator((raw["lat"].values, raw["lon"].values), raw["u"].values[k].astype(np.float64))
        expected = f(np.stack(np.meshgrid(lat_lr, lon_lr, indexing="ij"), -1))
        np.testing.assert_allclose(cov.values[i, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    with_cov = attach(data, cov)
    assert with_cov.lr.shape == (12, 2, 4, 6) and with_cov.meta["covariates"] == ["u"]
    assert torch.equal(with_cov.lr[:, :1], data.lr)


def test_static_fields_become_block_channels_and_position_and_season_are_derived(tmp_path):
    data = target(tmp_path)
    elevation = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    xr.Dataset({"z": (("lat", "lon"), elevation)}, coords={"lat": data.grid.y.values, "lon": data.grid.x.values}
               ).to_netcdf(tmp_path / "s.nc")
    cov = load_covariates(CovariateSpec(static=(str(tmp_path / "s.nc"), ["z"]), position=True, season=True),
                          data.grid, SCALE)
    assert cov.names[:4] == ["z[0,0]", "z[0,1]", "z[1,0]", "z[1,1]"]
    assert cov.names[4:] == ["latitude", "sin longitude", "cos longitude", "sin season", "cos season"]
    for i in range(2):
        for j in range(2):
            np.testing.assert_array_equal(cov.values[3, 2 * i + j].numpy(), elevation[i::2, j::2])
    lat_lr = data.grid.y.values.reshape(4, 2).mean(1)
    np.testing.assert_allclose(cov.values[0, 4, :, 0].numpy(), lat_lr / 90, rtol=1e-6)
    day = (data.grid.sample.values[5] - data.grid.sample.values[5].astype("datetime64[Y]")) / np.timedelta64(1, "D")
    assert cov.values[5, 7, 0, 0].item() == pytest.approx(np.sin(2 * np.pi * day / 365.25), abs=1e-6)


def test_a_missing_mis_timed_or_mis_gridded_covariate_is_a_one_line_error(tmp_path):
    data = target(tmp_path)
    predictor_file(tmp_path, n=8, name="short.nc")  # ends before the target does
    with pytest.raises(ValueError, match=r"variable 'u' has no field at 6 of the target's 12 times \(first "
                                         r"missing: 2000-07"):
        load_covariates(CovariateSpec(predictors=(str(tmp_path / "short.nc"), ["u"])), data.grid, SCALE)
    with pytest.raises(ValueError, match=r"no variable 'v' \(variables: \['u'\]\)"):
        load_covariates(CovariateSpec(predictors=(str(tmp_path / "short.nc"), ["v"])), data.grid, SCALE)
    with pytest.raises(FileNotFoundError, match="--static .*: no file at"):
        load_covariates(CovariateSpec(static=(str(tmp_path / "none.nc"), ["z"])), data.grid, SCALE)
    xr.Dataset({"z": (("lat", "lon"), np.zeros((8, 12), np.float32))},
               coords={"lat": data.grid.y.values + 1.0, "lon": data.grid.x.values}).to_netcdf(tmp_path / "off.nc")
    with pytest.raises(ValueError, match=r"variable 'z' is on lat 8 values -9…11.*the target's grid is lat 8 values "
                                         r"-10…10"):
        load_covariates(CovariateSpec(static=(str(tmp_path / "off.nc"), ["z"])), data.grid, SCALE)
    far = xr.Dataset({"u": (("time", "lat", "lon"), np.zeros((12, 3, 3), np.float32))},
                     coords={"time": data.grid.sample.values, "lat": [0.0, 1, 2], "lon": [0.0, 1, 2]})
    far.to_netcdf(tmp_path / "far.nc")
    with pytest.raises(ValueError, match="does not cover the target's input grid"):
        load_covariates(CovariateSpec(predictors=(str(tmp_path / "far.nc"), ["u"])), data.grid, SCALE)
    with pytest.raises(ValueError, match="need the target's coordinates"):
        load_covariates(CovariateSpec(season=True), None, SCALE)
