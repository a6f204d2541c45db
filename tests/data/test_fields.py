"""Gridded fields read with xarray: formats by content, dimensions, coordinates, streaming."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

xr = pytest.importorskip("xarray")
pytest.importorskip("netCDF4")

from podiff.data import datasets as data  # noqa: E402
from podiff.data import fields  # noqa: E402
from podiff.data.fields import Axis  # noqa: E402


def dataset(n=6, h=8, w=12, level=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) + ((level,) if level else ()) + (h, w)
    dims = ("time",) + (("level",) if level else ()) + ("lat", "lon")
    coords = {"time": np.arange("2001-01", f"2001-{n + 1:02d}" if n < 12 else "2002-01", dtype="datetime64[M]")
              .astype("datetime64[ns]")[:n], "lat": np.linspace(-10, 10, h), "lon": np.linspace(0, 22, w)}
    return xr.Dataset({"sst": (dims, rng.normal(size=shape).astype("f4"), {"units": "K"}),
                       "ice": (dims, rng.normal(size=shape).astype("f4"))}, coords=coords)


def test_formats_are_recognised_by_content(tmp_path):
    ds = dataset()
    ds.to_netcdf(tmp_path / "a.bin", format="NETCDF3_CLASSIC")
    ds.to_netcdf(tmp_path / "b.cdf", format="NETCDF4")
    ds.to_zarr(tmp_path / "c.store", mode="w", consolidated=False)
    np.savez(open(tmp_path / "d.nc", "wb"), hr=np.zeros((2, 4, 4)))  # an .npz whatever its name
    (tmp_path / "e.nc").write_text("not a dataset")
    assert [fields.sniff(tmp_path / n) for n in ("a.bin", "b.cdf", "c.store", "d.nc", "e.nc")] == \
        ["netcdf3", "netcdf4", "zarr", "npz", None]
    assert fields.sniff(str(tmp_path / "*.cdf")) == "glob"
    for name in ("a.bin", "b.cdf", "c.store"):
        out = data.load(str(tmp_path / name), scale=2, var="sst")
        torch.testing.assert_close(out.hr[:, 0], torch.from_numpy(ds["sst"].values))
    assert data.load(str(tmp_path / "d.nc"), scale=2).hr.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="e.nc is not an .npz archive, a netCDF file or a Zarr store"):
        data.load(str(tmp_path / "e.nc"), scale=2)


def test_dimensions_channels_and_time(tmp_path):
    ds = dataset(n=8, level=3).transpose("lat", "time", "lon", "level")  # any order on disk
    ds.to_netcdf(tmp_path / "f.nc")
    field, grid = fields.open_field(tmp_path / "f.nc", "sst")
    assert field.dims == ("time", "channel", "lat", "lon") and grid.channels == ["level=0", "level=1", "level=2"]
    np.testing.assert_array_equal(field.values, ds["sst"].transpose("time", "level", "lat", "lon").values)
    flat = dataset(n=8)
    flat.to_netcdf(tmp_path / "g.nc")
    stacked, grid = fields.open_field(tmp_path / "g.nc", channels=["sst", "ice"], time="2001-03:2001-05")
    assert stacked.shape == (3, 2, 8, 12) and grid.channels == ["sst", "ice"]
    np.testing.assert_array_equal(stacked.values[:, 1], flat["ice"].values[2:5])
    assert [str(t)[:7] for t in grid.sample.values] == ["2001-03", "2001-04", "2001-05"]
    renamed = flat.rename({"lat": "row", "lon": "col"})
    renamed.to_netcdf(tmp_path / "h.nc")
    f2, g2 = fields.open_field(tmp_path / "h.nc", "sst", dims=("row", "col"))
    assert (g2.y.name, g2.x.name) == ("row", "col") and f2.shape == (8, 1, 8, 12)
    with pytest.raises(ValueError, match=r"has no dimension 'lat' \(dimensions: \['time', 'row', 'col'\]\)"):
        fields.open_field(tmp_path / "h.nc", "sst", dims=("lat", "col"))


def test_bad_coordinates_are_named(tmp_path):
    ds = dataset()
    lat = ds["lat"].values.copy()
    lat[3] = lat[2]
    ds.assign_coords(lat=lat).to_netcdf(tmp_path / "dup.nc")
    with pytest.raises(ValueError, match=r"dup.nc: variable 'sst': coordinate 'lat' has duplicated values"):
        data.load(str(tmp_path / "dup.nc"), scale=2, var="sst")
    lon = ds["lon"].values.copy()
    lon[[0, 5]] = lon[[5, 0]]
    ds.assign_coords(lon=lon).to_netcdf(tmp_path / "shuffled.nc")
    with pytest.raises(ValueError, match="coordinate 'lon' has values that are not monotonic"):
        data.load(str(tmp_path / "shuffled.nc"), scale=2, var="sst")
    ds.isel(lat=slice(0, 1)).to_netcdf(tmp_path / "thin.nc")
    with pytest.raises(ValueError, match="a 1×12 grid is smaller than --scale 2"):
        data.load(str(tmp_path / "thin.nc"), scale=2, var="sst")
    descending = ds.isel(lat=slice(None, None, -1))  # north to south is a valid axis
    descending.to_netcdf(tmp_path / "desc.nc")
    assert data.load(str(tmp_path / "desc.nc"), scale=2, var="sst").grid.y.values[0] == 10.0


def test_high_resolution_coordinates_from_low_resolution_ones_are_exact():
    hr = Axis("lat", -4.875 + 0.25 * np.arange(40))
    lr = fields.coarsen_axis(hr, 4)
    np.testing.assert_allclose(lr.values, -4.5 + np.arange(10), atol=1e-12)
    np.testing.assert_allclose(fields.refine_axis(lr, 4).values, hr.values, atol=1e-12)
    descending = Axis("lat", hr.values[::-1].copy())
    np.testing.assert_allclose(fields.refine_axis(fields.coarsen_axis(descending, 4), 4).values, descending.values,
                               atol=1e-12)
    # An irregular axis: each coarse cell splits evenly, and the block means return the centres.
    lr = Axis("x_lr", np.array([0.0, 1.0, 3.0, 6.0]))
    fine = fields.refine_axis(lr, 2)
    assert fine.name == "x" and np.all(np.diff(fine.values) > 0)


def test_streaming_fit_equals_the_in_memory_fit(tmp_path):
    from podiff.data.standardise import fit_scaling, standardise
    from podiff.data.streaming import fit_pod_streaming
    from podiff.latent.pod import PatchPOD

    ds = dataset(n=11, h=16, w=20, seed=3)
    ds["sst"][:, :3, :4] = np.nan  # land
    ds["sst"] = ds["sst"] * 3 + 290
    ds.to_zarr(tmp_path / "f.zarr", mode="w", consolidated=False)
    whole = data.load(str(tmp_path / "f.zarr"), scale=4, var="sst")
    _, hr, _ = whole.split("train")
    expected = PatchPOD(4, rank=6).fit(standardise(hr, *fit_scaling(hr, ~torch.isnan(hr))), progress=False)
    # 3 samples a chunk: the scaling and the statistics merge across 3 chunks.
    streamed = fit_pod_streaming(PatchPOD(4, rank=6), tmp_path / "f.zarr", "sst", 4, split="train",
                                 budget_bytes=3 * 16 * 20 * 4, progress=False)
    torch.testing.assert_close(streamed.mean, expected.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.eigenvalues, expected.eigenvalues, atol=1e-5, rtol=1e-5)
    a, b = streamed.basis.reshape(-1, 6), expected.basis.reshape(-1, 6)
    overlap = (a.T @ b).abs()  # the same modes, up to sign
    torch.testing.assert_close(overlap.diagonal(), torch.ones(6, dtype=overlap.dtype), atol=1e-4, rtol=0)


PEAK = """
import json, sys
import numpy as np, xarray as xr
from podiff.latent.pod import PatchPOD
from podiff.data.streaming import fit_pod_streaming
ds = xr.open_zarr(sys.argv[1]); ds["sst"].isel(time=slice(0, 1)).values  # warm: imports, codecs
def peak():  # this process's high-water mark (VmHWM; ru_maxrss keeps the forking parent's across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
before = peak()
fit_pod_streaming(PatchPOD(4, rank=4), sys.argv[1], "sst", 4, budget_bytes=int(sys.argv[2]), progress=False)
print(json.dumps({"growth_mib": peak() - before}))
"""


@pytest.mark.slow
def test_fit_pod_streams_a_dataset_larger_than_its_budget(tmp_path):
    """24 and 192 MiB of fields through fit-pod in 2 MiB chunks: the process's high-water mark does
    not grow with the data. Measured: +126-128 MiB and +130-139 MiB, what both share being fixed (the
    first chunks' strips, the kernels' first use); read whole (a 2 GiB chunk), 96 MiB of fields
    add 566 MiB more than 24 do."""
    growth, data_mib = {}, {}
    h = w = 256
    for n in (96, 768):
        store = tmp_path / f"f{n}.zarr"
        template = xr.Dataset({"sst": (("time", "lat", "lon"), np.zeros((n, h, w), "f4"))},
                              coords={"lat": np.arange(h, dtype="f8"), "lon": np.arange(w, dtype="f8")})
        template.chunk({"time": 8}).to_zarr(store, mode="w", compute=False, consolidated=False)
        rng = np.random.default_rng(0)
        for t0 in range(0, n, 32):  # written in slabs: the test itself never holds the whole array
            slab = rng.normal(size=(32, h, w)).astype("f4")
            xr.Dataset({"sst": (("time", "lat", "lon"), slab)}).to_zarr(store, region={"time": slice(t0, t0 + 32)},
                                                                         consolidated=False)
        data_mib[n] = n * h * w * 4 / 2**20
        out = subprocess.run([sys.executable, "-c", PEAK, str(store), str(2 << 20)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        growth[n] = json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]
    print(f"fit-pod streaming: peak RSS +{growth[96]:.1f} MiB for {data_mib[96]:.0f} MiB of fields, "
          f"+{growth[768]:.1f} MiB for {data_mib[768]:.0f} MiB")
    assert growth[768] - growth[96] < (data_mib[768] - data_mib[96]) / 4, (growth, data_mib)
