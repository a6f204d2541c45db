"""The command on scientists' files: a netCDF with coordinates, land as _FillValue, packed values
and a time axis through fit-pod, train, sample --out pred.nc and evaluate; the same from a Zarr
store and a glob of files; a prediction from the low-resolution field alone."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

xr = pytest.importorskip("xarray")
pytest.importorskip("netCDF4")
pytest.importorskip("zarr")

from utils import run_command as run  # noqa: E402

from podiff.cli import main  # noqa: E402
from podiff.latent.pod import PatchPOD  # noqa: E402

N, H, W = 40, 24, 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``field.nc`` (all months), ``train.nc`` / ``test.nc``, a Zarr copy, two netCDF parts, and
    the LR-only test field; land is ``_FillValue`` in int16 packed with scale_factor/add_offset."""
    root = tmp_path_factory.mktemp("netcdf")
    g = torch.Generator().manual_seed(5)
    smooth = F.avg_pool2d(F.avg_pool2d(torch.randn(N, 1, H + 8, W + 8, generator=g), 5, stride=1), 5, stride=1)
    sst = (smooth[:, 0].numpy() * 5 + 290.0).astype("f4")
    sst[:, :4, :6] = np.nan
    time = np.arange("2000-01", "2003-05", dtype="datetime64[M]").astype("datetime64[ns]")
    ds = xr.Dataset({"sst": (("time", "lat", "lon"), sst, {"units": "K", "long_name": "sea surface temperature"})},
                    coords={"time": time, "lat": ("lat", np.linspace(-5.75, 5.75, H), {"units": "degrees_north"}),
                            "lon": ("lon", np.linspace(100.25, 115.75, W), {"units": "degrees_east"})})
    packed = {"sst": {"dtype": "int16", "scale_factor": 0.001, "add_offset": 290.0, "_FillValue": np.int16(-32767)}}
    ds.to_netcdf(root / "field.nc", encoding=packed)
    ds.isel(time=slice(0, 32)).to_netcdf(root / "train.nc", encoding=packed)
    ds.isel(time=slice(32, None)).to_netcdf(root / "test.nc", encoding=packed)
    decoded = xr.open_dataset(root / "field.nc").load()  # the packed values, so that every copy is equal
    decoded.to_zarr(root / "field.zarr", mode="w", consolidated=False)
    for i, part in enumerate((slice(0, 20), slice(20, None))):
        ds.isel(time=part).to_netcdf(root / f"part{i}.nc", encoding=packed)
    ds.isel(time=slice(32, None)).coarsen(lat=4, lon=4).mean().to_netcdf(root / "test_lr.nc")
    return root, xr.open_dataset(root / "field.nc").load()


@pytest.fixture(scope="module")
def model(files, tmp_path_factory):
    """One training run shared by the tests that need a model."""
    root, _ = files
    run_dir = tmp_path_factory.mktemp("run") / "run"
    code = main(["train", "--data", str(root / "train.nc"), "--scale", "4", "--out", str(run_dir), "--steps", "60",
                 "--eval-every", "20", "--quiet", "--no-regression-baseline"])
    assert code == 0
    return run_dir


def test_fit_pod_from_netcdf_zarr_and_a_glob_agree(files, tmp_path, capsys):
    root, _ = files
    pods = []
    for source in ("field.nc", "field.zarr", "part*.nc"):
        out = tmp_path / f"{source.replace('*', 'X')}.safetensors"
        code, _, err = run(capsys, "fit-pod", "--data", root / source, "--scale", 4, "--rank", 5, "--out", out,
                           "--quiet", "--chunk-mb", 0.02)  # a few months a chunk: the statistics stream
        assert code == 0, err
        pods.append(PatchPOD.load(out))
    for other in pods[1:]:
        torch.testing.assert_close(other.eigenvalues, pods[0].eigenvalues, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.mean, pods[0].mean, atol=1e-5, rtol=0)


def test_sample_writes_a_dataset_with_the_inputs_coordinates(files, model, tmp_path, capsys):
    root, truth = files
    code, _, err = run(capsys, "sample", "--model", model, "--data", root / "test.nc", "--split", "all",
                       "--num-samples", 4, "--members", "--variance", "--out", tmp_path / "pred.nc", "--quiet")
    assert code == 0, err
    pred = xr.open_dataset(tmp_path / "pred.nc")
    test = truth.isel(time=slice(32, None))
    assert {"mean", "std", "variance", "members", "input", "truth", "sample_index"} <= set(pred.data_vars)
    for name in ("time", "lat", "lon"):  # the high-resolution coordinates are the file's, exactly
        np.testing.assert_array_equal(pred[name].values, test[name].values)
    np.testing.assert_allclose(pred["lat_lr"].values, test["lat"].values.reshape(-1, 4).mean(1), atol=1e-12)
    assert pred["mean"].dims == ("time", "lat", "lon") and pred["members"].dims == ("member", "time", "lat", "lon")
    assert pred["input"].dims == ("time", "lat_lr", "lon_lr")
    land = np.isnan(test["sst"].values)
    assert land.any() and np.array_equal(np.isnan(pred["mean"].values), land)  # NaN on land ...
    assert pred["mean"].encoding["_FillValue"] == np.float32(9.969209968386869e36)  # ... written as _FillValue
    np.testing.assert_allclose(pred["std"].values ** 2, pred["variance"].values, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(pred["truth"].values, test["sst"].values, atol=1e-6)
    assert pred["mean"].attrs["units"] == "K" and "sea surface temperature" in pred["mean"].attrs["long_name"]
    attrs = pred.attrs
    assert attrs["Conventions"].startswith("CF-") and attrs["scale"] == 4 and attrs["num_samples"] == 4
    assert {"model", "seed", "steps", "sampler", "podiff_version", "torch_version", "history"} <= set(attrs)
    assert float(np.nanmean(np.abs(pred["mean"].values - test["sst"].values))) < 0.5  # a real prediction
    # The same ensemble as .npz: the file format changes nothing.
    code, _, err = run(capsys, "sample", "--model", model, "--data", root / "test.nc", "--split", "all",
                       "--num-samples", 4, "--out", tmp_path / "pred.npz", "--quiet")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npz")["mean"][:, 0], pred["mean"].values)


def test_evaluate_reads_netcdf_and_writes_maps_where_and_when(files, model, tmp_path, capsys):
    root, truth = files
    for suffix in ("nc", "zarr"):
        assert run(capsys, "sample", "--model", model, "--data", root / "test.nc", "--split", "all",
                   "--num-samples", 4, "--members", "--out", tmp_path / f"pred.{suffix}", "--quiet")[0] == 0
    reports = {}
    for suffix in ("nc", "zarr"):
        code, _, err = run(capsys, "evaluate", "--pred", tmp_path / f"pred.{suffix}", "--data", root / "test.nc",
                           "--out", tmp_path / f"report_{suffix}")
        assert code == 0, err
        reports[suffix] = json.loads((tmp_path / f"report_{suffix}" / "metrics.json").read_text())
    assert reports["nc"]["model"]["rmse"] == pytest.approx(reports["zarr"]["model"]["rmse"], rel=1e-6)
    maps = xr.open_dataset(tmp_path / "report_nc" / "metrics_maps.nc")
    assert maps["rmse_map"].dims == ("channel", "lat", "lon") and maps["rmse_time"].dims == ("time", "channel")
    np.testing.assert_array_equal(maps["time"].values, truth["time"].values[32:])
    rmse_map = maps["rmse_map"].values
    assert np.isnan(rmse_map[0, :4, :6]).all() and np.isfinite(rmse_map[0, 10:, 10:]).all()
    # The per-time RMSEs recombine to the report's RMSE (equal valid pixels per month: a fixed coast).
    overall = float(np.sqrt(np.mean(maps["rmse_time"].values.astype(np.float64) ** 2)))
    assert overall == pytest.approx(reports["nc"]["model"]["rmse"], rel=1e-4)


def test_zarr_and_glob_inputs_and_a_prediction_from_the_coarse_field_alone(files, model, tmp_path, capsys):
    root, truth = files
    for source in ("field.zarr", "part*.nc"):
        code, _, err = run(capsys, "sample", "--model", model, "--data", root / source, "--split", "test",
                           "--num-samples", 2, "--out", tmp_path / "p.zarr", "--quiet", "--overwrite")
        assert code == 0, err
        pred = xr.open_zarr(tmp_path / "p.zarr")
        assert pred.sizes["time"] == 6 and "truth" in pred
        np.testing.assert_array_equal(pred["time"].values, truth["time"].values[-6:])
    code, _, err = run(capsys, "sample", "--model", model, "--data", root / "test_lr.nc", "--split", "all",
                       "--num-samples", 2, "--out", tmp_path / "coarse.nc", "--quiet")
    assert code == 0, err
    coarse = xr.open_dataset(tmp_path / "coarse.nc")
    assert "truth" not in coarse and coarse["mean"].shape == (8, H, W)
    np.testing.assert_allclose(coarse["lat"].values, truth["lat"].values, atol=1e-9)  # derived exactly
    np.testing.assert_allclose(coarse["lon"].values, truth["lon"].values, atol=1e-9)
    code, _, err = run(capsys, "evaluate", "--pred", tmp_path / "coarse.nc", "--data", root / "test_lr.nc",
                       "--out", tmp_path / "r")
    assert code == 1 and "holds no truth" in err and not (tmp_path / "r").exists()


def test_fields_the_model_cannot_take_are_one_line_errors(files, model, tmp_path, capsys):
    root, truth = files
    truth.isel(lat=slice(0, 20)).to_netcdf(tmp_path / "cut.nc")
    xr.Dataset({"a": truth["sst"], "b": truth["sst"]}).to_netcdf(tmp_path / "two.nc")
    cases = [
        (["--data", tmp_path / "cut.nc"], "fit neither the model's high-resolution grid [1, 24, 32] nor its input "
                                          "grid [1, 6, 8]"),
        (["--data", root / "test.nc", "--scale", 2], "--scale 2 does not match the model's scale 4"),
        (["--data", root / "test.nc", "--var", "tos"], "has no variable 'tos' (variables: ['sst'])"),
        (["--data", tmp_path / "two.nc", "--channels", "a,b"], "fit neither the model's high-resolution grid [1, 24"),
        (["--data", root / "test.nc", "--out", tmp_path / "p.csv"], "must end in .nc, .zarr or .npz"),
    ]
    for extra, message in cases:
        argv = ["sample", "--model", model, "--num-samples", 2, "--quiet", "--split", "all", *extra]
        if "--out" not in extra:
            argv += ["--out", tmp_path / "p.nc"]
        code, _, err = run(capsys, *argv)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "p.nc").exists()


def test_sample_crops_a_grid_as_train_did(files, model, tmp_path):
    """A test file on the training file's grid before its crop to a multiple of the scale (two more
    latitudes here) is cropped as training cropped it: the same prediction as on the cropped file."""
    root, field = files
    test = field.isel(time=slice(32, None))
    extra = test.isel(lat=slice(-2, None)).assign_coords(lat=test["lat"].values[-2:] + 1.0)
    xr.concat([test, extra], "lat").to_netcdf(tmp_path / "tall.nc")
    test.to_netcdf(tmp_path / "cropped.nc")
    for name in ("tall", "cropped"):
        assert main(["sample", "--model", str(model), "--data", str(tmp_path / f"{name}.nc"), "--split", "all",
                     "--num-samples", "2", "--sample-steps", "2", "--out", str(tmp_path / f"{name}_pred.nc"),
                     "--quiet"]) == 0
    tall, cropped = (xr.open_dataset(tmp_path / f"{name}_pred.nc") for name in ("tall", "cropped"))
    np.testing.assert_array_equal(tall["mean"].values, cropped["mean"].values)


def test_a_model_of_any_domain_samples_a_wider_file_and_a_fixed_one_says_why_not(files, model, tmp_path, capsys):
    """``train --domain any --crop``: trained on crops of the 24×32 file, it samples a 24×56 file (the
    test months beside a copy of their western 24 columns, land included) as a user's larger domain."""
    root, field = files
    test = field.isel(time=slice(32, None))
    west = test.isel(lon=slice(0, 24)).assign_coords(lon=test["lon"].values[:24] + 16.0)
    xr.concat([test, west], "lon").to_netcdf(tmp_path / "wide.nc")
    run_dir = tmp_path / "anywhere"
    code, _, err = run(capsys, "train", "--data", root / "train.nc", "--scale", 4, "--out", run_dir, "--steps", 20,
                       "--eval-every", 10, "--domain", "any", "--crop", 4, "--residual", "ridge", "--quiet",
                       "--no-regression-baseline", "--no-unet-baseline")
    assert code == 0, err
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tmp_path / "wide.nc", "--split", "all",
                       "--num-samples", 3, "--out", tmp_path / "wide_pred.nc", "--quiet")
    assert code == 0, err
    pred = xr.open_dataset(tmp_path / "wide_pred.nc")
    assert pred["mean"].shape == (8, 24, 56)
    np.testing.assert_array_equal(pred["lon"].values, np.concatenate([test["lon"].values, west["lon"].values]))
    # NaN on the input cells with no data (whole cells: a coarse input cannot say which pixels of a
    # coastal cell are land, so those are predicted)
    cells = np.isnan(pred["truth"].values[0]).reshape(6, 4, 14, 4).all((1, 3))
    assert cells.sum() == 2 and np.array_equal(np.isnan(pred["mean"].values[0]), np.kron(cells, np.ones((4, 4))) > 0)
    assert float(np.nanmean(np.abs(pred["mean"].values - pred["truth"].values))) < 0.5  # a real prediction
    code, _, err = run(capsys, "sample", "--model", model, "--data", tmp_path / "wide.nc", "--split", "all",
                       "--num-samples", 2, "--out", tmp_path / "fixed_pred.nc", "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "(it samples only its training grid: it holds " in err and "global attention" in err
