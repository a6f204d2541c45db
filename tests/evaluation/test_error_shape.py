"""``podiff.evaluation.error_shape``: the predictive ``mean + sd · Z`` with ``Z`` learnt from validation errors."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from podiff.evaluation import error_shape, metrics

properscoring = pytest.importorskip("properscoring")


def heavy_tailed(n, seed, df=3.0, scale_error=1.3):
    """Fields whose errors are Student-t times the predicted sd (a scale mixture, like edges)."""
    rng = np.random.default_rng(seed)
    mean = torch.from_numpy(rng.normal(size=n))
    var = torch.from_numpy(rng.uniform(0.05, 2.0, size=n))
    obs = mean + scale_error * var.sqrt() * torch.from_numpy(rng.standard_t(df, size=n))
    return mean, var, obs


def test_crps_equals_properscoring_on_the_atoms():
    mean, var, obs = heavy_tailed(500, 0)
    q = np.sort(np.random.default_rng(1).standard_t(3, size=57))
    got = error_shape.crps(mean, var, obs, q, reduce=False)
    ensemble = mean.numpy()[:, None] + var.sqrt().numpy()[:, None] * q
    np.testing.assert_allclose(got.numpy(), properscoring.crps_ensemble(obs.numpy(), ensemble), rtol=1e-10, atol=1e-12)
    assert error_shape.crps(mean, var, obs, q) == pytest.approx(float(got.mean()), rel=1e-12)


def test_gaussian_quantiles_reproduce_the_gaussian_scores():
    mean, var, obs = heavy_tailed(4000, 2)
    q = norm.ppf((np.arange(4000) + 0.5) / 4000)
    assert error_shape.crps(mean, var, obs, q) == pytest.approx(metrics.crps_gaussian(mean, var, obs), rel=1e-4)
    shaped, gauss = error_shape.coverage(mean, var, obs, q), metrics.coverage_gaussian(mean, var, obs)
    assert all(abs(shaped[k] - gauss[k]) <= 2e-3 for k in gauss), (shaped, gauss)
    lo, hi = error_shape.central_interval(mean, var, 0.9)
    torch.testing.assert_close(hi - mean, norm.ppf(0.95) * var.sqrt())
    lo_q, hi_q = error_shape.central_interval(mean, var, 0.9, q)
    torch.testing.assert_close(lo_q, lo, rtol=0, atol=2e-3 * 1.5)


def test_the_validation_shape_covers_new_fields_where_no_gaussian_does():
    fit_on, new = heavy_tailed(200_000, 3, df=2.0), heavy_tailed(200_000, 4, df=2.0)
    q = error_shape.fit_error_quantiles(*fit_on)
    assert len(q) == error_shape.QUANTILE_COUNT and q == sorted(q)
    from scipy.stats import t

    levels = (np.arange(200) + 0.5) / 200
    np.testing.assert_allclose(q[20:180], 1.3 * t.ppf(levels[20:180], 2), rtol=0.03, atol=0.01)
    shaped = error_shape.coverage(*new, q)
    assert metrics.mace(shaped) < 0.005, shaped
    # one spread factor cannot make a Gaussian cover at every level: the best is far off
    mean, var, obs = new
    best = min(metrics.mace(metrics.coverage_gaussian(mean, k * k * var, obs)) for k in np.linspace(0.5, 3, 101))
    assert best > 0.03
    k = metrics.calibrated_spread(*fit_on, limits=(0.1, 10))
    assert error_shape.crps(*new, q) < metrics.crps_gaussian(mean, k * k * var, obs)


def test_fit_respects_masks_and_counts():
    mean, var, obs = heavy_tailed(1000, 5)
    obs_nan = obs.clone()
    obs_nan[:500] = float("nan")
    assert error_shape.fit_error_quantiles(mean, var, obs_nan) == error_shape.fit_error_quantiles(
        mean[500:], var[500:], obs[500:])
    mask = torch.arange(1000) >= 500
    assert error_shape.fit_error_quantiles(mean, var, obs, mask=mask) == error_shape.fit_error_quantiles(
        mean[500:], var[500:], obs[500:])
    zero = var.clone()
    zero[:500] = 0  # no spread: no standardised error
    assert error_shape.fit_error_quantiles(mean, zero, obs) == error_shape.fit_error_quantiles(
        mean[500:], var[500:], obs[500:])
    assert len(error_shape.fit_error_quantiles(mean[:50], var[:50], obs[:50])) == 50  # fewer pixels than 200
    assert len(error_shape.fit_error_quantiles(mean, var, obs, count=7)) == 7
    with pytest.raises(ValueError, match="count must be None or an integer >= 2; got 1"):
        error_shape.fit_error_quantiles(mean, var, obs, count=1)
    with pytest.raises(ValueError, match="fitting 2000 quantiles needs at least 2000"):
        error_shape.fit_error_quantiles(mean, var, obs, count=2000)
    with pytest.raises(ValueError, match="var must be non-negative"):
        error_shape.fit_error_quantiles(mean, -var, obs)


def test_bad_quantiles_and_levels_are_named():
    with pytest.raises(ValueError, match="error_quantiles must hold at least two finite, non-decreasing values"):
        error_shape.check_error_quantiles([1.0, 0.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        error_shape.crps(torch.zeros(2), torch.ones(2), torch.zeros(2), [0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="must be a sequence of numbers"):
        error_shape.check_error_quantiles("wide")
    with pytest.raises(ValueError, match="level must be in \\(0, 1\\); got 1.0"):
        error_shape.central_interval(torch.zeros(2), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="var must be non-negative"):
        error_shape.crps(torch.zeros(2), -torch.ones(2), torch.zeros(2), [0.0, 1.0])
    from podiff.model.state import Calibration

    with pytest.raises(ValueError, match="error_quantiles must hold"):
        Calibration(error_quantiles=[2.0])
    assert Calibration(error_quantiles=(-1, 1)).error_quantiles == [-1.0, 1.0]


def test_asymmetric_shape_gives_asymmetric_intervals():
    q = [-1.0, -0.5, 0.0, 2.0, 4.0]  # levels 0.1 … 0.9
    assert error_shape.quantile(q, 0.5) == 0.0 and error_shape.quantile(q, 0.8) == pytest.approx(3.0)
    assert error_shape.quantile(q, 0.01) == -1.0 and error_shape.quantile(q, 0.99) == 4.0  # the end values
    lo, hi = error_shape.central_interval(torch.tensor([1.0]), torch.tensor([4.0]), 0.6, q)
    assert float(lo) == pytest.approx(1 - 2 * 0.75) and float(hi) == pytest.approx(1 + 2 * 3.0)


def test_intervals_from_a_prediction_files_arrays():
    mean, var = np.zeros((2, 1, 4, 4), np.float32), np.full((2, 1, 4, 4), 4.0, np.float32)
    lo, hi = error_shape.central_interval(mean, var, 0.6, [-1.0, -0.5, 0.0, 2.0, 4.0])
    assert torch.allclose(lo, torch.full((2, 1, 4, 4), -1.5)) and torch.allclose(hi, torch.full((2, 1, 4, 4), 6.0))
    lo, hi = error_shape.central_interval(mean, var, 0.9, [])  # written without a shape: Gaussian
    assert torch.allclose(hi, torch.full((2, 1, 4, 4), 2 * float(norm.ppf(0.95))))


def level_dependent(n, seed, low_fraction):
    """Errors over the predicted sd that are three times wider on dark pixels (mean < 0.3) than on
    bright ones, as at the dark edge of a head; ``low_fraction`` of the pixels are dark."""
    rng = np.random.default_rng(seed)
    dark = rng.random(n) < low_fraction
    mean = np.where(dark, rng.uniform(0.0, 0.3, n), rng.uniform(0.3, 1.0, n))
    var = rng.uniform(0.01, 0.04, n)
    z = rng.standard_t(4, n) * np.where(dark, 1.5, 0.5)
    as_tensor = lambda a: torch.from_numpy(a)  # noqa: E731
    return as_tensor(mean), as_tensor(var), as_tensor(mean + np.sqrt(var) * z)


def test_bands_of_the_predicted_mean_cover_where_the_mix_of_levels_shifts():
    fit_on = level_dependent(100_000, 0, low_fraction=0.2)
    new = level_dependent(100_000, 1, low_fraction=0.5)  # the test fields hold more dark pixels
    one, none_ = error_shape.fit_error_shape(*fit_on, bands=1)
    assert none_ is None and one == error_shape.fit_error_quantiles(*fit_on)
    banded, edges = error_shape.fit_error_shape(*fit_on, bands=5)
    assert len(banded) == 5 and len(edges) == 1 and len(edges[0]) == 4
    np.testing.assert_allclose(edges[0], np.quantile(fit_on[0].numpy(), [0.2, 0.4, 0.6, 0.8]))
    assert metrics.mace(error_shape.coverage(*new, one)) > 0.03
    assert metrics.mace(error_shape.coverage(*new, banded, edges=edges)) < 0.01
    assert error_shape.crps(*new, banded, edges=edges) < error_shape.crps(*new, one)
    # each pixel takes its band's shape
    mean, var, obs = new
    band = torch.bucketize(mean, torch.tensor(edges[0], dtype=torch.float64), right=True)
    lo, hi = error_shape.central_interval(mean, var, 0.9, banded, edges)
    per_pixel = error_shape.crps(mean, var, obs, banded, reduce=False, edges=edges)
    for b in range(5):
        inside = band == b
        lo_b, hi_b = error_shape.central_interval(mean[inside], var[inside], 0.9, banded[b])
        torch.testing.assert_close(lo[inside], lo_b)
        torch.testing.assert_close(hi[inside], hi_b)
        torch.testing.assert_close(per_pixel[inside], error_shape.crps(mean[inside], var[inside], obs[inside],
                                                                       banded[b], reduce=False))


def test_bands_are_per_channel_and_bad_shapes_say_what_is_wrong():
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([torch.rand(50, 8, 8, generator=g), 280 + 10 * torch.rand(50, 8, 8, generator=g)], 1)
    var = torch.full_like(mean, 0.01)
    obs = mean + 0.1 * torch.randn(mean.shape, generator=g)
    banded, edges = error_shape.fit_error_shape(mean, var, obs, bands=3)
    assert len(edges) == 2 and edges[0][1] < 1 and edges[1][0] > 280  # each channel's own levels
    for c in range(2):
        np.testing.assert_allclose(edges[c], np.quantile(mean[:, c].double().numpy(), [1 / 3, 2 / 3]), rtol=1e-6)
    cov = error_shape.coverage(mean, var, obs, banded, edges=edges)
    assert metrics.mace(cov) < 0.02, cov
    with pytest.raises(ValueError, match=r"edges for 2 channels need mean \[\.\.\., 2, H, W\]"):
        error_shape.central_interval(mean[:, 0], var[:, 0], 0.5, banded, edges)
    with pytest.raises(ValueError, match="error_band_edges must be given"):
        error_shape.check_error_shape(banded)
    with pytest.raises(ValueError, match=r"error_band_edges must be \[C\]\[2\] non-decreasing"):
        error_shape.check_error_shape(banded, [[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"error_band_edges must be \[C\]\[2\]"):
        error_shape.check_error_shape(banded, [[0.0, 0.5, 1.0]])
    with pytest.raises(ValueError, match="bands must be an integer >= 1"):
        error_shape.fit_error_shape(mean, var, obs, bands=0)
    from podiff.model.state import Calibration

    with pytest.raises(ValueError, match="error_band_edges needs error_quantiles"):
        Calibration(error_band_edges=[[0.5]])
    assert Calibration(error_quantiles=banded, error_band_edges=edges).error_band_edges == edges
