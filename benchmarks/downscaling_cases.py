"""Downscaling cases built from packaged data only, written as netCDF files a user would have.

    python benchmarks/downscaling_cases.py --out /tmp/cases            # every case
    python benchmarks/downscaling_cases.py --out /tmp/cases --case winds

Each case is a folder with ``train.nc`` and ``test.nc`` (the high-resolution variable, time
first; the last ``TEST_FRACTION`` of the months to test, as a user keeps the latest) and, where
the case has them, ``predictors.nc`` (coarse fields of other variables on their own coarse
grid) and ``static.nc`` (high-resolution fields on the target grid). The cases:

- ``sst``: the packaged OSTIA SST band (iris-sample-data), 54 months, 16 × 432 (land masked).
- ``sst_trend``: the same with a warming of 0.05 K per month on average added (2.7 K over the
  series), its rate varying by ±60 % from pixel to pixel (a smoothed random pattern, 1-pixel
  scale): the last fields, which validate and test, are warmer than any training field, and
  where within a coarse block the warming goes is learnt from the fields only.
- ``winds``: the zonal wind of Debian's ``ferret-datasets`` (``monthly_navy_winds``, 132 months
  of 1982–1992, 72 × 144 on a 2.5° grid), with the coarse meridional wind as a predictor and the
  land–sea mask and elevation (ETOPO20 averaged to the grid) as static fields. Strong
  small-scale structure.
- ``lapse``: a surface air temperature built from packaged fields, where a static field should
  matter: the large-scale part is the coarse wind field's smooth anomaly scaled to kelvin, plus a
  seasonal cycle, minus a lapse rate (6.5 K/km, ±30 % with the season) times ETOPO20 elevation on
  the 72 × 144 grid. What is below the coarse grid is mostly the elevation's.

Requires ``apt-get install ferret-datasets`` (``/usr/share/ferret-vis/data``) for the last two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FERRET = Path("/usr/share/ferret-vis/data")
CASES = ("sst", "sst_trend", "winds", "lapse")
TEST_FRACTION = 0.2


def _xarray():
    import xarray as xr

    return xr


def _ferret(name: str):
    path = FERRET / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: apt-get install ferret-datasets")
    return _xarray().open_dataset(path)


def _write(ds, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.nc")
    ds = ds.copy()
    ds.encoding = {}
    ds.to_netcdf(tmp)
    tmp.replace(path)


def _write_target(ds, folder: Path) -> None:
    """``train.nc`` and ``test.nc``: the fields split by time, the last ``TEST_FRACTION`` to test."""
    time = next(iter(ds.dims))
    n = ds.sizes[time]
    n_test = int(round(TEST_FRACTION * n))
    _write(ds.isel({time: slice(0, n - n_test)}), folder / "train.nc")
    _write(ds.isel({time: slice(n - n_test, n)}), folder / "test.nc")


def sst(out: Path, trend_per_month: float = 0.0) -> None:
    import importlib.util

    xr = _xarray()
    spec = importlib.util.find_spec("iris_sample_data")
    path = Path(list(spec.submodule_search_locations)[0]) / "sample_data/ostia_monthly.nc"
    ds = xr.open_dataset(path)
    da = ds["surface_temperature"].load()
    if trend_per_month:
        from scipy import ndimage

        # warming faster in some places than others, varying within a 4-pixel block (as along fronts
        # and coasts): the coarse field shows the mean warming, not where within a block it goes
        rng = np.random.default_rng(0)
        pattern = ndimage.gaussian_filter(rng.standard_normal(da.shape[1:]), 1.0)
        pattern = 1 + 0.6 * pattern / pattern.std()
        months = np.arange(da.sizes[da.dims[0]], dtype=np.float32)[:, None, None]
        da = (da + (trend_per_month * months * pattern).astype(np.float32)).assign_attrs(da.attrs)
    _write_target(da.to_dataset(name="sst"), out)


def _winds_grid():
    """The navy winds on 72 × 144 (the last latitude row dropped: 73 is not divisible by 4)."""
    ds = _ferret("monthly_navy_winds.cdf").isel(FNOCY=slice(0, 72))
    return ds.rename({"TIME": "time", "FNOCY": "lat", "FNOCX": "lon"})


def _elevation_on(lat, lon):
    """ETOPO20 elevation (m, sea floor at 0) averaged over each target cell, and the land fraction."""
    etopo = _ferret("etopo20.cdf")["ROSE"].rename({"ETOPO20Y": "lat", "ETOPO20X1_1081": "lon"})
    etopo = etopo.isel(lon=slice(0, 1080))  # the last column repeats the first
    lon360 = (etopo["lon"] % 360).values
    etopo = etopo.assign_coords(lon=lon360).sortby("lon")
    lat_edges = np.concatenate([[lat[0] - 1.25], (lat[1:] + lat[:-1]) / 2, [lat[-1] + 1.25]])
    lon_t = np.asarray(lon) % 360
    elev = np.empty((len(lat), len(lon_t)))
    land = np.empty_like(elev)
    values = etopo.values
    elat, elon = etopo["lat"].values, etopo["lon"].values
    for i in range(len(lat)):
        rows = (elat >= lat_edges[i]) & (elat < lat_edges[i + 1])
        for j, c in enumerate(lon_t):
            d = np.abs(((elon - c) + 180) % 360 - 180)
            block = values[rows][:, d <= 1.25]
            elev[i, j] = np.clip(block, 0, None).mean()
            land[i, j] = (block > 0).mean()
    return elev.astype(np.float32), land.astype(np.float32)


def winds(out: Path) -> None:
    xr = _xarray()
    ds = _winds_grid()
    _write_target(ds[["UWND"]].rename({"UWND": "uwnd"}), out)
    coarse = ds[["VWND"]].coarsen(lat=4, lon=4).mean().rename({"VWND": "vwnd"})
    _write(coarse, out / "predictors.nc")
    elev, land = _elevation_on(ds["lat"].values, ds["lon"].values)
    static = xr.Dataset({"elevation": (("lat", "lon"), elev), "land": (("lat", "lon"), land)},
                        coords={"lat": ds["lat"], "lon": ds["lon"]})
    _write(static, out / "static.nc")


def lapse(out: Path) -> None:
    from scipy import ndimage

    xr = _xarray()
    ds = _winds_grid()
    elev, land = _elevation_on(ds["lat"].values, ds["lon"].values)
    u = ds["UWND"].values.astype(np.float64)
    anomaly = u - u.mean(0)
    large = np.stack([ndimage.gaussian_filter(a, 6, mode="wrap") for a in anomaly])  # ~15° scales
    months = np.arange(u.shape[0])
    season = np.cos(2 * np.pi * months / 12)[:, None, None]
    lat = ds["lat"].values[None, :, None]
    base = 300 - 40 * np.sin(np.deg2rad(lat)) ** 2 + 8 * season * np.sin(np.deg2rad(lat))
    lapse_rate = 6.5e-3 * (1 + 0.3 * season)
    temp = base + 2.0 * large - lapse_rate * elev[None]
    da = xr.DataArray(temp.astype(np.float32), dims=("time", "lat", "lon"),
                      coords={"time": ds["time"], "lat": ds["lat"], "lon": ds["lon"]},
                      attrs={"units": "K", "long_name": "constructed surface air temperature"})
    _write_target(da.to_dataset(name="tas"), out)
    static = xr.Dataset({"elevation": (("lat", "lon"), elev), "land": (("lat", "lon"), land)},
                        coords={"lat": ds["lat"], "lon": ds["lon"]})
    _write(static, out / "static.nc")


def build(case: str, out: Path) -> Path:
    folder = out / case
    {"sst": lambda: sst(folder), "sst_trend": lambda: sst(folder, 0.05), "winds": lambda: winds(folder),
     "lapse": lambda: lapse(folder)}[case]()
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--case", choices=CASES, action="append")
    args = parser.parse_args(argv)
    for case in args.case or CASES:
        print(f"{case}: {build(case, args.out)}")


if __name__ == "__main__":
    main()
