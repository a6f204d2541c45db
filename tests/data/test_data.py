"""Data loaders on the real packaged files, users' .npz / netCDF files, splits and errors."""

import importlib.util

import numpy as np
import pytest
import torch

from podiff.data import datasets as data


def test_block_average_ignores_masked_pixels():
    hr = torch.arange(16.0).reshape(1, 1, 4, 4)
    hr[0, 0, 0, 0] = float("nan")
    lr = data.block_average(hr, 2)
    assert lr[0, 0, 0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert lr[0, 0, 1, 1] == pytest.approx((10 + 11 + 14 + 15) / 4)
    hr[0, 0, :2, :2] = float("nan")
    assert torch.isnan(data.block_average(hr, 2)[0, 0, 0, 0])
    with pytest.raises(ValueError, match="not divisible by scale=3"):
        data.block_average(hr, 3)


def test_splits_are_ordered_and_disjoint():
    parts = [data.split_indices(54, s) for s in ("train", "val", "test")]
    assert np.array_equal(np.concatenate(parts), np.arange(54))
    assert parts[2][-1] == 53 and len(parts[2]) == 8  # the last months are the test set
    with pytest.raises(ValueError, match="split must be one of"):
        data.split_indices(10, "holdout")


@pytest.mark.skipif(importlib.util.find_spec("iris_sample_data") is None or importlib.util.find_spec("xarray") is None,
                    reason="needs the data extra")
def test_sst_from_iris_sample_data():
    ds = data.load("sst")
    # Read through the user's path, coordinates kept: the band's latitudes and the months.
    assert ds.grid.y.name == "latitude" and ds.grid.x.name == "longitude" and ds.grid.attrs["units"] == "K"
    assert len(ds.grid.y.values) == 16 and len(ds.grid.x.values) == 432
    assert str(ds.grid.sample.values[0])[:7] == "2006-04" and len(ds.grid.sample.values) == 54
    assert ds.hr.shape == (54, 1, 16, 432) and ds.lr.shape == (54, 1, 4, 108) and ds.scale == 4
    land = torch.isnan(ds.hr)
    assert 0.2 < float(land.float().mean()) < 0.35  # the band crosses land
    assert (land == land[:1]).all()  # a fixed land mask
    sea = ds.hr[~land]
    assert 285 < float(sea.min()) and float(sea.max()) < 310  # kelvin, tropical
    lr, hr, idx = ds.split("test")
    assert idx.tolist() == list(range(46, 54)) and lr.shape[0] == hr.shape[0] == 8


@pytest.mark.skipif(importlib.util.find_spec("nibabel") is None or importlib.util.find_spec("nilearn") is None,
                    reason="needs the data extra")
def test_mri_from_the_nilearn_wheel():
    ds = data.load("mri")
    assert ds.hr.shape[1:] == (1, 128, 128) and len(ds) > 40
    assert float(ds.hr.min()) >= 0 and float(ds.hr.max()) <= 1 and float(ds.hr.mean()) > 0.05


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
def test_images_from_scikit_image():
    ds = data.load_images(scale=4, size=32, names=("camera", "coins"))
    assert ds.hr.shape[1:] == (1, 32, 32) and ds.lr.shape[1:] == (1, 8, 8)
    assert float(ds.hr.min()) >= 0 and float(ds.hr.max()) <= 1
    colour = data.load_images(scale=4, size=32, names=("astronaut", "camera"), rgb=True)
    assert colour.hr.shape[1:] == (3, 32, 32)
    grey_crop = colour.hr[colour.meta["photograph"].index("camera")]  # grey: its three channels are equal
    colour_crop = colour.hr[colour.meta["photograph"].index("astronaut")]
    assert torch.equal(grey_crop[0], grey_crop[1]) and not torch.equal(colour_crop[0], colour_crop[1])


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
def test_images_split_takes_part_of_every_photograph():
    names = ("camera", "coins", "page")  # 64, 24 and 12 crops of 64²: unequal counts
    by_position = data.load_images(scale=4, size=64, names=names)
    in_order = data.load_images(scale=4, size=64, names=names, by_position=False)
    assert in_order.meta["photograph"] == ["camera"] * 64 + ["coins"] * 24 + ["page"] * 12
    # The same crops, reordered.
    assert sorted(by_position.hr.flatten(1).sum(1).tolist()) == sorted(in_order.hr.flatten(1).sum(1).tolist())
    for split in ("train", "val", "test"):
        _, hr, idx = by_position.split(split)
        assert set(by_position.meta["photograph"][i] for i in idx) == set(names), split
    # Within a photograph the crops keep their raster order: the test crops are its bottom rows.
    _, _, test = by_position.split("test")
    camera_rows = [in_order.hr[:64].flatten(1).tolist().index(by_position.hr[i].flatten().tolist()) // 8
                   for i in test if by_position.meta["photograph"][i] == "camera"]
    assert min(camera_rows) >= 6, camera_rows
    assert set(in_order.meta["photograph"][i] for i in in_order.split("test")[2]) == {"coins", "page"}
    with pytest.raises(ValueError, match="size"):
        data.load_images(scale=4, size=1024, names=("coins",))


def test_npz_files(tmp_path):
    hr = np.random.default_rng(0).normal(size=(6, 12, 12)).astype(np.float32)
    hr[:, :3, :3] = np.nan  # one whole 3×3 block
    np.savez(tmp_path / "only_hr.npz", hr=hr)
    ds = data.load(str(tmp_path / "only_hr.npz"), scale=3)
    assert ds.hr.shape == (6, 1, 12, 12) and ds.lr.shape == (6, 1, 4, 4)
    assert torch.isnan(ds.lr[:, :, 0, 0]).all()
    np.savez(tmp_path / "both.npz", hr=hr[:, None], lr=hr[:, None, ::2, ::2])
    assert data.load_npz(tmp_path / "both.npz").scale == 2
    with pytest.raises(ValueError, match="no 'lr': give --scale"):
        data.load_npz(tmp_path / "only_hr.npz")
    np.savez(tmp_path / "no_hr.npz", x=hr)
    with pytest.raises(ValueError, match=r"has no 'hr' array \(keys: \['x'\]\)"):
        data.load_npz(tmp_path / "no_hr.npz")
    np.savez(tmp_path / "mismatch.npz", hr=hr, lr=hr[:4, ::2, ::2])
    with pytest.raises(ValueError, match="'lr' has 4 samples but 'hr' has 6"):
        data.load_npz(tmp_path / "mismatch.npz")
    with pytest.raises(ValueError, match="--scale 3 does not match the file's lr/hr ratio 2"):
        data.load_npz(tmp_path / "both.npz", scale=3)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        data.load_npz(tmp_path / "broken.npz")
    with pytest.raises(FileNotFoundError, match="no dataset named"):
        data.load(str(tmp_path / "missing.npz").replace(".npz", ""))
    with pytest.raises(ValueError, match="must be \\[N, C, H, W\\] or \\[N, H, W\\]"):
        np.savez(tmp_path / "flat.npz", hr=np.zeros(5))
        data.load_npz(tmp_path / "flat.npz", scale=2)


@pytest.mark.skipif(importlib.util.find_spec("xarray") is None, reason="needs the data extra")
def test_netcdf_variables(tmp_path):
    import xarray as xr

    values = np.random.default_rng(1).normal(size=(5, 8, 8)).astype(np.float32)
    values[:, 0, 0] = np.nan
    field = xr.Dataset({"tos": (("time", "y", "x"), values), "other": (("time", "y", "x"), values)})
    field.to_netcdf(tmp_path / "field.dat", encoding={"tos": {"_FillValue": np.float32(-999.0), "dtype": "int16",
                                                                "scale_factor": 0.001}})
    out = data.load(str(tmp_path / "field.dat"), scale=2, var="tos")  # recognised by content, not suffix
    assert out.hr.shape == (5, 1, 8, 8) and torch.isnan(out.hr[:, 0, 0, 0]).all()
    torch.testing.assert_close(out.hr[:, 0, 1:, 1:], torch.from_numpy(values[:, 1:, 1:]), atol=5e-4, rtol=0)
    with pytest.raises(ValueError, match=r"has no variable 'sst' \(variables: \['other', 'tos'\]\)"):
        data.load(str(tmp_path / "field.dat"), scale=2, var="sst")
    with pytest.raises(ValueError, match="choose one with --var"):
        data.load(str(tmp_path / "field.dat"), scale=2)


def test_missing_package_says_which_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xarray" else real(name, *a))
    with pytest.raises(data.MissingDependency, match=r"needs the 'xarray' package: pip install 'podiff\[data\]'"):
        data.load_sst()
