"""podiff.data.bounds: blocks whose block mean sits at a physical bound are certain; the pipeline, the
coverage metrics and the evaluation's baselines treat them so; CF valid ranges declare bounds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.data import bounds
from podiff.data.datasets import block_average
from podiff.evaluation import error_shape, metrics
from podiff.fitting import fit


def nonnegative_fields(n, seed, size=16):
    """Smooth fields clipped at 0: large patches of exact zeros, as around a head in an MRI."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 1, size + 6, size + 6, generator=g)
    return (F.avg_pool2d(w, 7, stride=1) * 7 - 0.3).clamp_min(0)


def test_check_bounds():
    assert bounds.check_bounds(None) is None
    assert bounds.check_bounds([None, None]) is None
    assert bounds.check_bounds((0, 1)) == (0.0, 1.0)
    assert bounds.check_bounds([0, None]) == (0.0, None)
    for bad, message in (((1, 0), "lo < hi"), ((0, 0), "lo < hi"), ((0,), r"\(lo, hi\)"), ("0,1", r"\(lo, hi\)"),
                         ((float("nan"), 1), "lo must be finite"), ((0, float("inf")), "hi must be finite")):
        with pytest.raises(ValueError, match=message):
            bounds.check_bounds(bad)
    with pytest.raises(ValueError, match="lo < hi"):
        PipelineConfig(bounds=[1, 0])
    assert PipelineConfig(bounds=(0, None)).bounds == [0.0, None]


def test_certain_pixels_are_the_blocks_at_a_bound():
    hr = torch.tensor([[[[0.0, 0, 1, 1, 0.5, 0], [0, 0, 1, 1, 0, 0]]]])  # [1, 1, 2, 6], scale 2
    lr = block_average(hr, 2)  # 0, 1, 0.125
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(bounds.certain_pixels(lr, (0, 1), 2)[0, 0], expected)
    assert torch.equal(bounds.certain_pixels(lr, (0, None), 2)[0, 0], expected & torch.tensor([True] * 2 + [False] * 4))
    assert not bounds.certain_pixels(lr, None, 2).any()
    # within float rounding of the bound, not beyond
    near = torch.tensor([[[[1e-9, 1e-3]]]])
    assert bounds.certain_pixels(near, (0, None), 2)[0, 0, 0].tolist() == [True, True, False, False]
    masked = torch.tensor([[[[float("nan"), 0.0]]]])
    assert bounds.certain_pixels(masked, (0, None), 2)[0, 0, 0].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match=r"lr must be \[N, C, h, w\]"):
        bounds.certain_pixels(torch.zeros(2, 2), (0, 1), 2)
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        bounds.certain_pixels(lr, (0, 1), 0)


def test_apply_sets_certain_pixels_to_the_truth_and_leaves_the_rest():
    hr = nonnegative_fields(6, 0)
    lr = block_average(hr, 4)
    certain = bounds.certain_pixels(lr, (0, None), 4)
    assert 0.1 < float(certain.float().mean()) < 0.9  # the test needs both kinds
    g = torch.Generator().manual_seed(1)
    mean = hr + 0.1 * torch.randn(hr.shape, generator=g)
    var = torch.rand(hr.shape, generator=g) + 0.01
    members = mean + torch.randn((5, *hr.shape), generator=g)
    m, v, s = bounds.apply(mean, lr, (0, None), 4, var, members)
    assert torch.equal(m[certain], hr[certain]) and bool((hr[certain] == 0).all())
    assert bool((v[certain] == 0).all()) and bool((s[:, certain] == 0).all())
    assert torch.equal(m[~certain], mean[~certain]) and torch.equal(v[~certain], var[~certain])
    assert torch.equal(s[:, ~certain], members[:, ~certain])
    assert metrics.rmse(m, hr) < metrics.rmse(mean, hr)  # the certain pixels' errors are gone
    # the upper bound takes its own value
    top = 1 - hr
    m_top = bounds.apply(torch.zeros_like(top), block_average(top, 4), (None, 1), 4)[0]
    assert torch.equal(m_top[certain], torch.ones_like(m_top[certain]))
    # masked pixels stay masked; without bounds nothing changes
    masked = mean.clone()
    masked[..., :4, :4] = float("nan")
    assert bool(bounds.apply(masked, lr, (0, None), 4)[0][..., :4, :4].isnan().all())
    assert bounds.apply(mean, lr, None, 4, var)[0] is mean
    with pytest.raises(ValueError, match=r"mean must be \[N, C, h·scale, w·scale\]"):
        bounds.apply(mean[..., :8], lr, (0, None), 4)
    with pytest.raises(ValueError, match=r"members must be \[M, 6, 1, 16, 16\]"):
        bounds.apply(mean, lr, (0, None), 4, members=members[..., :8])


def test_check_pairs():
    hr = nonnegative_fields(4, 2)
    lr = block_average(hr, 4)
    bounds.check_pairs(lr, hr, (0, None), 4)
    masked = torch.where(hr > 1, float("nan"), hr)  # block means of the valid pixels, as the loaders make them
    bounds.check_pairs(block_average(masked, 4), masked, (0, None), 4)
    with pytest.raises(ValueError, match=r"hr must be >= the lower bound 0.5; its minimum is 0"):
        bounds.check_pairs(lr, hr, (0.5, None), 4)
    with pytest.raises(ValueError, match=r"hr must be <= the upper bound 0.1"):
        bounds.check_pairs(lr, hr, (None, 0.1), 4)
    with pytest.raises(ValueError, match="lr to be the block mean of hr"):
        bounds.check_pairs(F.interpolate(hr, scale_factor=0.25, mode="bilinear"), hr, (0, None), 4)


def test_coverage_leaves_out_point_masses_at_the_observation():
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(4000, generator=g, dtype=torch.float64)
    mean, var = torch.zeros_like(obs), torch.ones_like(obs)
    plain = metrics.coverage_gaussian(mean, var, obs)
    # 3000 more pixels known exactly: the coverage of the uncertain ones is unchanged
    obs2 = torch.cat([obs, torch.full((3000,), 2.0, dtype=torch.float64)])
    mean2 = torch.cat([mean, torch.full((3000,), 2.0, dtype=torch.float64)])
    var2 = torch.cat([var, torch.zeros(3000, dtype=torch.float64)])
    assert metrics.coverage_gaussian(mean2, var2, obs2) == plain
    q = error_shape.fit_error_quantiles(mean, var, obs)
    assert error_shape.coverage(mean2, var2, obs2, q) == error_shape.coverage(mean, var, obs, q)
    members = torch.randn(9, 4000, generator=g, dtype=torch.float64)
    members2 = torch.cat([members, torch.full((9, 3000), 2.0, dtype=torch.float64)], 1)
    assert metrics.coverage(members2, obs2) == metrics.coverage(members, obs)
    # a point mass away from the observation is a miss, not left out
    wrong = mean2.clone()
    wrong[4000:] = 1.0
    cov = metrics.coverage_gaussian(wrong, var2, obs2)
    assert all(abs(cov[k] - plain[k] * 4000 / 7000) < 1e-12 for k in plain)
    with pytest.raises(ValueError, match="no pixel with an uncertain prediction"):
        metrics.coverage_gaussian(obs, torch.zeros_like(obs), obs)


def tiny_config(**kw):
    base = dict(residual="none", antithetic=False, scale=4, patch_size=4, rank=8, train_steps=3, batch_size=8,
                sample_steps=3,
                denoiser=dict(width=32, depth=1, heads=2))
    return PipelineConfig(**{**base, **kw})


@pytest.mark.parametrize("residual", ["none", "ridge"])
def test_pipeline_samples_are_certain_at_the_bound(residual):
    hr = nonnegative_fields(24, 3)
    lr = block_average(hr, 4)
    pipe = PODiffPipeline(tiny_config(bounds=[0, None], residual=residual))
    fit(pipe, lr[:20], hr[:20], progress=False)
    out = pipe.sample(lr[20:], num_samples=4, seed=0, return_samples=True)
    certain = bounds.certain_pixels(lr[20:], (0, None), 4)
    assert bool(certain.any()) and bool((~certain).any())
    assert bool((out.mean[certain] == 0).all()) and bool((out.variance[certain] == 0).all())
    assert bool((out.samples[:, certain] == 0).all())
    assert bool((out.variance[~certain] > 0).all())
    free = PODiffPipeline(tiny_config(residual=residual))
    fit(free, lr[:20], hr[:20], progress=False)
    plain = free.sample(lr[20:], num_samples=4, seed=0)
    assert torch.allclose(out.mean[~certain], plain.mean[~certain], atol=1e-5)  # the rest as without bounds


def test_pipeline_refuses_fields_that_break_the_bounds(tmp_path):
    hr = nonnegative_fields(12, 4) - 0.05
    with pytest.raises(ValueError, match="hr must be >= the lower bound 0"):
        fit(PODiffPipeline(tiny_config(bounds=[0, None])), block_average(hr, 4), hr, progress=False)
    hr = hr + 0.05
    pipe = PODiffPipeline(tiny_config(bounds=[0, 10]))
    fit(pipe, block_average(hr, 4), hr, progress=False)
    pipe.save(tmp_path / "model")
    assert PODiffPipeline.load(tmp_path / "model").config.bounds == [0.0, 10.0]


def test_declared_bounds_from_cf_attributes():
    xr = pytest.importorskip("xarray")
    from podiff.data.fields import declared_bounds

    da = xr.DataArray(np.zeros((2, 3)), attrs={"valid_range": np.array([0.0, 1.0], dtype=np.float32)})
    assert declared_bounds(da) == (0.0, 1.0)
    assert declared_bounds(xr.DataArray(np.zeros(2), attrs={"valid_min": np.float32(0)})) == (0.0, None)
    assert declared_bounds(xr.DataArray(np.zeros(2), attrs={"valid_max": 5})) == (None, 5.0)
    assert declared_bounds(xr.DataArray(np.zeros(2))) is None
    packed = xr.DataArray(np.zeros(2), attrs={"valid_range": [0, 1000]})
    packed.encoding.update(scale_factor=0.01, add_offset=273.15)  # CF: in packed units
    lo, hi = declared_bounds(packed)
    assert lo == pytest.approx(273.15) and hi == pytest.approx(283.15)
    assert declared_bounds(xr.DataArray(np.zeros(2), attrs={"valid_range": [1, 0]})) is None


def test_gridded_file_declares_its_bounds(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("netCDF4")
    from podiff.data.datasets import load_gridded

    values = nonnegative_fields(3, 5).numpy()[:, 0]
    da = xr.DataArray(values, dims=("time", "y", "x"), attrs={"valid_min": 0.0, "units": "mm/day"})
    xr.Dataset({"rain": da}).to_netcdf(tmp_path / "rain.nc")
    ds = load_gridded(tmp_path / "rain.nc", None, 4)
    assert ds.meta["bounds"] == [0.0, None] and ds.grid.bounds == (0.0, None)
    xr.Dataset({"rain": xr.DataArray(values, dims=("time", "y", "x"))}).to_netcdf(tmp_path / "plain.nc")
    assert "bounds" not in load_gridded(tmp_path / "plain.nc", None, 4).meta


@pytest.mark.parametrize("memory_mb", [None, 0.01], ids=["in-memory", "streamed"])
def test_train_takes_the_bounds_a_netcdf_variable_declares(tmp_path, capsys, memory_mb):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("netCDF4")
    import json

    from utils import run_command

    values = nonnegative_fields(30, 6).numpy()[:, 0]
    da = xr.DataArray(values, dims=("time", "y", "x"), attrs={"valid_range": np.array([0.0, 50.0], "f4")})
    xr.Dataset({"rain": da}).to_netcdf(tmp_path / "rain.nc")
    args = ["train", "--data", tmp_path / "rain.nc", "--scale", 4, "--out", tmp_path / "run", "--steps", 2,
            "--batch-size", 4, "--rank", 4, "--no-regression-baseline", "--quiet"]
    if memory_mb:
        args += ["--memory-mb", memory_mb]
    code, out, err = run_command(capsys, *args)
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "train.json").read_text())
    assert info["bounds"] == [0.0, 50.0] and bool(info["streamed"]) == bool(memory_mb)
    # data that break their declared bounds train without them, and say so
    xr.Dataset({"rain": da - 1.0}).to_netcdf(tmp_path / "shifted.nc")
    args[2], args[6] = tmp_path / "shifted.nc", tmp_path / "run2"
    code, out, err = run_command(capsys, *[a for a in args if a != "--quiet"])
    assert code == 0, err
    assert "data declare bounds [0.0, 50.0] but bounds: hr must be >= the lower bound 0.0" in out
    assert json.loads((tmp_path / "run2" / "train.json").read_text())["bounds"] is None
