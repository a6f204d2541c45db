"""podiff.evaluation.metrics against independent implementations: scikit-image (PSNR, SSIM), properscoring
(CRPS), scipy (Gaussian intervals); masks; calibration diagnostics on known distributions."""

import math

import numpy as np
import pytest
import torch

from podiff.evaluation import metrics

skimage_metrics = pytest.importorskip("skimage.metrics")
properscoring = pytest.importorskip("properscoring")


def fields(seed=0, shape=(3, 1, 20, 24)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    pred = target + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return pred, target


def test_rmse_mae_psnr_with_and_without_mask():
    pred, target = fields()
    assert metrics.rmse(pred, target) == pytest.approx(float(((pred - target) ** 2).mean().sqrt()), rel=1e-12)
    assert metrics.mae(pred, target) == pytest.approx(float((pred - target).abs().mean()), rel=1e-12)
    rng = float(target.max() - target.min())
    expected = skimage_metrics.peak_signal_noise_ratio(target.numpy(), pred.numpy(), data_range=rng)
    assert metrics.psnr(pred, target, rng) == pytest.approx(expected, rel=1e-10)
    mask = torch.zeros(20, 24, dtype=torch.bool)
    mask[5:, 3:] = True
    sel = mask.expand_as(target)
    assert metrics.rmse(pred, target, mask) == pytest.approx(float(((pred - target)[sel] ** 2).mean().sqrt()))
    nan_target = target.clone()
    nan_target[..., :5, :] = float("nan")  # NaN in the target counts as masked
    assert metrics.mae(pred, nan_target) == pytest.approx(float((pred - target)[..., 5:, :].abs().mean()))


def test_ssim_matches_scikit_image():
    pred, target = fields(1, (2, 1, 32, 40))
    rng = float(target.max() - target.min())
    expected = np.mean([skimage_metrics.structural_similarity(t[0].numpy(), p[0].numpy(), data_range=rng, win_size=7)
                        for p, t in zip(pred, target, strict=True)])
    assert metrics.ssim(pred, target, rng) == pytest.approx(expected, rel=1e-6)
    assert metrics.ssim(target, target, rng) == pytest.approx(1.0)


@pytest.mark.parametrize("M", [2, 5, 40])
def test_crps_ensemble_matches_properscoring(M):
    g = torch.Generator().manual_seed(M)
    members = torch.randn(M, 4, 6, 7, generator=g, dtype=torch.float64)
    obs = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    expected = properscoring.crps_ensemble(obs.numpy(), np.moveaxis(members.numpy(), 0, -1))
    got = metrics.crps_ensemble(members, obs, reduce=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # The fair estimator: E|X − y| − Σ|x_i − x_j| / (2M(M − 1)).
    fair = metrics.crps_ensemble(members, obs, fair=True, reduce=False)
    pairs = (members[:, None] - members[None]).abs().sum((0, 1))
    manual = (members - obs).abs().mean(0) - pairs / (2 * M * (M - 1))
    torch.testing.assert_close(fair, manual)


def test_crps_gaussian_matches_properscoring_and_the_ensemble_limit():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, generator=g, dtype=torch.float64)
    var = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    obs = torch.randn(50, generator=g, dtype=torch.float64)
    expected = properscoring.crps_gaussian(obs.numpy(), mean.numpy(), var.sqrt().numpy())
    np.testing.assert_allclose(metrics.crps_gaussian(mean, var, obs, reduce=False).numpy(), expected, rtol=1e-10)
    members = mean + var.sqrt() * torch.randn(4000, 50, generator=g, dtype=torch.float64)
    assert metrics.crps_ensemble(members, obs, fair=True) == pytest.approx(
        metrics.crps_gaussian(mean, var, obs), rel=0.02)


def test_calibrated_ensemble_has_nominal_coverage_flat_ranks_and_unit_spread_skill():
    g = torch.Generator().manual_seed(1)
    M, n = 30, 20000
    centre = torch.randn(n, generator=g, dtype=torch.float64)
    members = centre + torch.randn(M, n, generator=g, dtype=torch.float64)
    obs = centre + torch.randn(n, generator=g, dtype=torch.float64)  # exchangeable with the members
    cov = metrics.coverage(members, obs)
    for level, frac in cov.items():  # Weibull positions: nominal on average (n = 20000: ±0.01),
        expected = min(level, (M - 1) / (M + 1))  # up to the extreme members' interval
        assert abs(frac - expected) < 0.01, (level, frac)
    assert metrics.mace(cov) < 0.015
    assert metrics.spread_skill_ratio(members, obs) == pytest.approx(1.0, abs=0.03)
    hist = metrics.rank_histogram(members, obs)
    assert hist.shape == (M + 1,) and int(hist.sum()) == n
    expected = n / (M + 1)
    assert float(((hist - expected) ** 2 / expected).sum()) < 3 * (M + 1)  # chi-square, loose
    narrow = centre + 0.3 * torch.randn(M, n, generator=g, dtype=torch.float64)
    assert metrics.coverage(narrow, obs)[0.9] < 0.5 and metrics.spread_skill_ratio(narrow, obs) < 0.5


def test_coverage_positions_by_hand():
    members = torch.arange(1.0, 10.0)[:, None]  # M = 9 members 1..9, one pixel
    # level 0.6: q = 0.2, 0.8 -> 0-based positions 1.0 and 7.0 -> interval [2, 8]
    for y, inside in [(2.0, 1.0), (8.0, 1.0), (1.9, 0.0), (8.1, 0.0)]:
        assert metrics.coverage(members, torch.tensor([y]), levels=(0.6,))[0.6] == inside


def test_gaussian_coverage_matches_scipy_intervals():
    g = torch.Generator().manual_seed(2)
    mean, var = torch.zeros(100000, dtype=torch.float64), torch.full((100000,), 4.0, dtype=torch.float64)
    obs = 2.0 * torch.randn(100000, generator=g, dtype=torch.float64)
    cov = metrics.coverage_gaussian(mean, var, obs)
    for level, frac in cov.items():
        assert abs(frac - level) < 0.01


def test_errors():
    pred, target = fields()
    with pytest.raises(ValueError, match="no valid pixels"):
        metrics.rmse(pred, target, torch.zeros(20, 24, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        metrics.rmse(pred, target, torch.ones(20, 24))
    with pytest.raises(ValueError, match="data_range must be positive"):
        metrics.psnr(pred, target, 0.0)
    with pytest.raises(ValueError, match=r"members must be \[M, \*obs.shape\]"):
        metrics.crps_ensemble(torch.zeros(3, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="levels must be in"):
        metrics.coverage(torch.zeros(3, 4), torch.zeros(4), levels=(1.5,))
    with pytest.raises(ValueError, match="coverage_dict is empty"):
        metrics.mace({})
    assert math.isinf(metrics.psnr(target, target, 1.0))


def test_scores_agree_with_xskillscore_on_masked_data_with_a_member_dimension():
    """xskillscore (the field's scoring library, independent of podiff) on the same xarray data:
    CRPS of the ensemble and of a Gaussian, rank histogram, RMSE; land points NaN."""
    xr = pytest.importorskip("xarray")
    xs = pytest.importorskip("xskillscore")
    from podiff.evaluation.metric_maps import metric_maps

    g = torch.Generator().manual_seed(3)
    M, N, H, W = 9, 5, 6, 7
    truth = torch.randn(N, 1, H, W, generator=g, dtype=torch.float64)
    members = truth + 0.3 + torch.randn(M, N, 1, H, W, generator=g, dtype=torch.float64)
    truth[:, :, :2, :3] = float("nan")  # land
    dims = ("time", "lat", "lon")
    obs = xr.DataArray(truth[:, 0].numpy(), dims=dims)
    fc = xr.DataArray(members[:, :, 0].numpy(), dims=("member",) + dims)
    valid = ~torch.isnan(truth)

    expected = float(xs.crps_ensemble(obs, fc, dim=[]).mean(skipna=True))
    assert metrics.crps_ensemble(members, truth) == pytest.approx(expected, rel=1e-10)
    mu, var = members.mean(0), members.var(0)
    expected = float(xs.crps_gaussian(obs, xr.DataArray(mu[:, 0].numpy(), dims=dims),
                                      xr.DataArray(var[:, 0].sqrt().numpy(), dims=dims), dim=[]).mean(skipna=True))
    assert metrics.crps_gaussian(mu, var, truth) == pytest.approx(expected, rel=1e-10)
    expected = float(xs.rmse(obs, fc.mean("member"), dim=list(dims), skipna=True))
    assert metrics.rmse(members.mean(0), truth) == pytest.approx(expected, rel=1e-12)
    points = valid[:, 0].numpy()  # continuous values: no ties, so the histograms are deterministic
    hist = xs.rank_histogram(xr.DataArray(truth[:, 0].numpy()[points], dims=("point",)),
                             xr.DataArray(members[:, :, 0].numpy()[:, points], dims=("member", "point")), dim="point")
    assert metrics.rank_histogram(members, truth).tolist() == hist.values.astype(int).tolist()
    # The per-location and per-time maps of the evaluate command, against xskillscore's reductions.
    maps = metric_maps(mu, var, truth, members)
    rmse_map = xs.rmse(obs, fc.mean("member"), dim="time", skipna=True).values
    np.testing.assert_allclose(maps["rmse_map"][0].numpy(), rmse_map, rtol=1e-12, equal_nan=True)
    expected = xs.rmse(obs, fc.mean("member"), dim=["lat", "lon"], skipna=True).values
    np.testing.assert_allclose(maps["rmse_time"][:, 0].numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("length", [100, 101])
def test_axis_power_spectrum_matches_scipy_periodogram(length):
    signal = pytest.importorskip("scipy.signal")
    ramp = torch.linspace(0, 5, length, dtype=torch.float64)  # a trend, which the detrending removes
    x = torch.randn(3, 7, length, generator=torch.Generator().manual_seed(length), dtype=torch.float64) + ramp
    k, p = metrics.power_spectrum(x, kind="axis")
    f, P = signal.periodogram(x.numpy(), fs=1.0, window="hann", detrend="linear", scaling="density", axis=-1)
    np.testing.assert_allclose(k.numpy(), f[1:], rtol=0, atol=1e-15)
    np.testing.assert_allclose(p.numpy(), P.reshape(-1, P.shape[-1]).mean(0)[1:] / length, rtol=1e-10)
    assert float(p.sum()) == pytest.approx(1.0, rel=0.05)  # about the white noise's variance
    k_t, p_t = metrics.power_spectrum(x.transpose(1, 2))  # a tall strip: along its longer axis
    torch.testing.assert_close(p_t, p)


def test_radial_power_spectrum_puts_a_plane_wave_in_its_bin():
    n = 32
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    wave = 3.0 * torch.cos(2 * math.pi * (3 * x + 4 * y) / n)  # |k| = 5/n
    k, p = metrics.power_spectrum(wave[None, None] + 0.1 * x - 0.2 * y)  # a trend, which is removed
    assert k.shape == (n // 2,) and float(k[4]) == pytest.approx(5 / n) and int(p.argmax()) == 4
    # The variance A²/2, in its bin and the Hann window's two neighbours.
    assert float(p[3:6].sum()) == pytest.approx(4.5, rel=1e-6)
    assert float(p.sum() - p[3:6].sum()) == pytest.approx(0, abs=1e-6)


def test_power_spectrum_leaves_masked_pixels_out():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 16, 96, generator=g, dtype=torch.float64)
    mask = torch.ones(16, 96, dtype=torch.bool)
    mask[3:9, 40:47] = False  # an island
    k, p = metrics.power_spectrum(x, mask)  # a strip: along the long axis, in quarter-line segments
    assert k.shape == (12,) and float(k[0]) == pytest.approx(1 / 24)
    torch.testing.assert_close(metrics.power_spectrum(torch.where(mask, x, 1e6), mask)[1], p)
    torch.testing.assert_close(metrics.power_spectrum(torch.where(mask, x, float("nan")))[1], p)
    # Welch by hand: every fully valid 24-pixel segment (hop 12), detrended, Hann-windowed.
    signal = pytest.importorskip("scipy.signal")
    pieces = [x[i, 0, r, c:c + 24].numpy() for i in range(6) for r in range(16) for c in range(0, 73, 12)
              if bool(mask[r, c:c + 24].all())]
    _, P = signal.periodogram(np.stack(pieces), fs=1.0, window="hann", detrend="linear", scaling="density")
    np.testing.assert_allclose(p.numpy(), P.mean(0)[1:] / 24, rtol=1e-10)
    # Square fields: only the fully valid ones enter the radial spectrum.
    square = torch.randn(4, 1, 32, 32, generator=g, dtype=torch.float64)
    holes = torch.ones_like(square, dtype=torch.bool)
    holes[1:, 0, 5, 5] = False
    torch.testing.assert_close(metrics.power_spectrum(square, holes, kind="radial")[1],
                               metrics.power_spectrum(square[:1], kind="radial")[1])
    with pytest.raises(ValueError, match="needs at least one field without masked pixels"):
        metrics.power_spectrum(square[1:], holes[1:], kind="radial")
    with pytest.raises(ValueError, match="no fully valid segment of 96 pixels"):
        metrics.power_spectrum(x[..., 3:9, :], mask[3:9], segment=96)  # every line crosses the island


def test_high_wavenumber_power_ratio_sees_lost_small_scales():
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(4, 1, 32, 32, generator=g, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(truth, 3, stride=1, padding=1, count_include_pad=False)
    assert metrics.high_wavenumber_power_ratio(truth[None].expand(3, -1, -1, -1, -1), truth) == pytest.approx(1.0)
    assert metrics.high_wavenumber_power_ratio(smooth, truth) < 0.2
    with pytest.raises(ValueError, match="members must be"):
        metrics.high_wavenumber_power_ratio(truth[..., :16], truth)
    with pytest.raises(ValueError, match="kind must be 'auto', 'radial' or 'axis'; got 'x'"):
        metrics.power_spectrum(truth, kind="x")


def test_grid_imprint_measures_a_patch_periodic_pattern():
    g = torch.Generator().manual_seed(0)
    cell = 1 + torch.rand(4, 4, generator=g, dtype=torch.float64)  # one patch's std pattern
    tiled = cell.repeat(3, 5)                                          # [12, 20]: 15 patches
    expected = float(cell.numpy().std() / cell.numpy().mean())
    assert metrics.grid_imprint(tiled, 4) == pytest.approx(expected, rel=1e-12)
    assert metrics.grid_imprint(torch.full((12, 20), 2.0), 4) == 0.0
    # a smooth map has almost no imprint at any period; the tiled one only at its own
    smooth = 2 + torch.sin(torch.arange(40.) / 7).double()[None].expand(40, 40)
    assert metrics.grid_imprint(smooth, 4) < 0.02 and metrics.grid_imprint(tiled, 3) < expected / 3
    # masked pixels are left out, leading dimensions are folded in too
    masked = tiled.clone().expand(2, 12, 20).clone()
    masked[0, :4, :4] = float("nan")
    assert metrics.grid_imprint(masked, 4) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="period must be in"):
        metrics.grid_imprint(tiled, 13)
    with pytest.raises(ValueError, match="positive map"):
        metrics.grid_imprint(tiled - 10, 4)


def _spread_case(seed, heavy):
    g = torch.Generator().manual_seed(seed)
    n = 200_000
    var = 0.2 + torch.rand(n, generator=g, dtype=torch.float64)  # heteroscedastic predicted variance
    z = torch.randn(n, generator=g, dtype=torch.float64)
    if heavy:  # mostly well predicted, a few gross errors (edges on a flat background)
        z = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.05, 8 * z, 0.5 * z)
    else:
        z = 1.5 * z  # an ensemble 1.5× too narrow
    mean = torch.zeros(n, dtype=torch.float64)
    return mean, var, mean + z * var.sqrt()


def test_calibrated_spread_moment_matching_is_the_mse_ratio():
    mean, var, obs = _spread_case(0, heavy=False)
    k = metrics.calibrated_spread(mean, var, obs, method="moments", limits=(0.01, 100))
    assert k**2 == pytest.approx(float((obs - mean).square().mean() / var.mean()), rel=1e-12)


@pytest.mark.parametrize("heavy", [False, True])
def test_calibrated_spread_minimises_the_crps_of_properscoring(heavy):
    mean, var, obs = _spread_case(1, heavy)
    k = metrics.calibrated_spread(mean, var, obs, method="crps", limits=(0.01, 100))
    sd = var.sqrt().numpy()

    def crps(scale):  # an independent implementation
        return properscoring.crps_gaussian(obs.numpy(), mean.numpy(), scale * sd).mean()

    grid = np.linspace(0.3, 3.0, 541)
    best = grid[np.argmin([crps(s) for s in grid])]
    assert k == pytest.approx(best, abs=0.006)
    assert crps(k) <= min(crps(k * 1.01), crps(k / 1.01))
    if heavy:  # the few gross errors inflate the moment-matched spread far past the CRPS optimum
        assert metrics.calibrated_spread(mean, var, obs, method="moments", limits=(0.01, 100)) > 1.5 * k
    else:
        assert k == pytest.approx(1.5, abs=0.02)


def test_calibrated_spread_clips_masks_and_rejects_bad_input():
    mean, var, obs = _spread_case(2, heavy=False)
    assert metrics.calibrated_spread(mean, var, obs, limits=(0.5, 1.2)) == 1.2
    assert metrics.calibrated_spread(mean, var, obs / 10, limits=(0.5, 1.2)) == 0.5
    spoiled = obs.clone()
    spoiled[:1000] = float("nan")  # masked pixels are left out
    mask = torch.ones_like(obs, dtype=torch.bool)
    mask[1000:2000] = False
    full = metrics.calibrated_spread(mean[2000:], var[2000:], obs[2000:], limits=(0.01, 100))
    assert metrics.calibrated_spread(mean, var, spoiled, mask=mask, limits=(0.01, 100)) == pytest.approx(full, rel=1e-9)
    with pytest.raises(ValueError, match="method must be one of"):
        metrics.calibrated_spread(mean, var, obs, method="mse")
    with pytest.raises(ValueError, match="limits must satisfy 0 < low <= high; got \\(2, 1\\)"):
        metrics.calibrated_spread(mean, var, obs, limits=(2, 1))
    with pytest.raises(ValueError, match="no valid pixel"):
        metrics.calibrated_spread(mean, var, torch.full_like(obs, float("nan")))


def _ensemble_case(seed, M=8, n=20_000, narrow=1.5):
    """Members ``M`` from ``N(0, σ²)`` and truths from ``N(0, narrow² σ²)``, σ varying by pixel."""
    g = torch.Generator().manual_seed(seed)
    sd = (0.2 + torch.rand(n, generator=g, dtype=torch.float64)).sqrt()
    members = torch.randn(M, n, generator=g, dtype=torch.float64) * sd
    return members, narrow * sd * torch.randn(n, generator=g, dtype=torch.float64)


def test_members_spread_minimises_their_fair_crps():
    members, obs = _ensemble_case(3)
    k = metrics.members_spread(members, obs, limits=(0.1, 10))
    centre = members.mean(0)

    def fair(scale):  # scored by crps_ensemble, which is tested against properscoring
        return metrics.crps_ensemble(centre + scale * (members - centre), obs, fair=True)

    grid = np.linspace(0.8, 2.5, 341)
    best = grid[np.argmin([fair(s) for s in grid])]
    assert k == pytest.approx(best, abs=0.006)
    assert fair(k) <= min(fair(k * 1.01), fair(k / 1.01))
    assert k > 1.2  # the members are 1.5× too narrow: they are widened
    assert metrics.members_spread(*_ensemble_case(5, narrow=0.5), limits=(0.1, 10)) < 0.8  # and too wide: narrowed


def test_members_spread_clips_masks_and_rejects_bad_input():
    members, obs = _ensemble_case(4, n=4000)
    assert metrics.members_spread(members, obs, limits=(0.5, 1.2)) == 1.2
    assert metrics.members_spread(members, obs / 100, limits=(0.5, 1.2)) == 0.5
    spoiled = obs.clone()
    spoiled[:500] = float("nan")
    mask = torch.ones_like(obs, dtype=torch.bool)
    mask[500:1000] = False
    full = metrics.members_spread(members[:, 1000:], obs[1000:], limits=(0.1, 10))
    assert metrics.members_spread(members, spoiled, mask=mask, limits=(0.1, 10)) == pytest.approx(full, rel=1e-9)
    with pytest.raises(ValueError, match="needs at least two members; got 1"):
        metrics.members_spread(members[:1], obs)
    with pytest.raises(ValueError, match="members must be \\[M, \\*obs.shape\\]"):
        metrics.members_spread(members, obs[:10])
    with pytest.raises(ValueError, match="limits must satisfy"):
        metrics.members_spread(members, obs, limits=(0, 1))


def test_band_power_ratios_against_scipy_welch_band_by_band():
    """Each band's ratio is the ratio of scipy's periodogram powers summed over the band's wavenumbers
    (an independent spectrum); white members over smoothed truth rise band by band."""
    signal = pytest.importorskip("scipy.signal")
    g = torch.Generator().manual_seed(3)
    truth = torch.randn(5, 1, 16, 256, generator=g, dtype=torch.float64).cumsum(-1)  # red, along the strip
    members = truth[None] + 2.0 * torch.randn(4, 5, 1, 16, 256, generator=g, dtype=torch.float64)
    bands = metrics.band_power_ratios(members, truth, bands=4)
    f, P_t = signal.periodogram(truth.numpy(), window="hann", detrend="linear", scaling="density", axis=-1)
    _, P_m = signal.periodogram(members.numpy(), window="hann", detrend="linear", scaling="density", axis=-1)
    P_t, P_m = P_t.reshape(-1, f.size).mean(0)[1:], P_m.reshape(-1, f.size).mean(0)[1:]
    f = f[1:]
    edges = np.logspace(np.log10(f[0]), np.log10(0.5), 5)
    assert [b["k_low"] for b in bands] == pytest.approx(edges[:4].tolist())
    for b, (lo, hi) in zip(bands, zip(edges[:-1], edges[1:], strict=True), strict=True):
        inside = (f >= lo) & ((f < hi) | (hi == 0.5))
        assert b["ratio"] == pytest.approx(P_m[inside].sum() / P_t[inside].sum(), rel=1e-9)
    ratios = [b["ratio"] for b in bands]
    assert ratios[0] < 1.02 < ratios[1] < 1.5 < ratios[2] < 5 < ratios[3]  # the added white noise: small scales
    same = metrics.band_power_ratios(truth[None].expand(3, -1, -1, -1, -1), truth)
    assert [b["ratio"] for b in same] == pytest.approx([1.0] * 4)
    with pytest.raises(ValueError, match="without a wavenumber .* use fewer bands"):
        metrics.band_power_ratios(truth[..., :16], truth[..., :16], bands=12)
    with pytest.raises(ValueError, match="bands must be an integer >= 1; got 0"):
        metrics.band_power_ratios(truth, truth, bands=0)


def test_patch_edge_ratio_sees_jumps_at_patch_edges():
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(3, 1, 36, 36, generator=g, dtype=torch.float64)
    truth = torch.nn.functional.avg_pool2d(noise, 5, stride=1)  # smooth, stationary: 32×32
    assert metrics.neighbour_jump_ratio(truth, 4) == pytest.approx(1.0, abs=0.1)  # no patch grid in it
    # Members with an independent offset per 4×4 patch: blocky.
    offsets = torch.randn(6, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    blocky = truth + 0.3 * offsets.repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert metrics.patch_edge_ratio(blocky, truth, 4) > 2.0
    assert metrics.patch_edge_ratio(truth[None].expand(2, -1, -1, -1, -1), truth, 4) == pytest.approx(1.0)
    # By hand on one tiny field: horizontal pairs only differ at the column edge 1|2 (patch 2).
    field = torch.tensor([[0.0, 1.0, 5.0, 6.0], [0.0, 1.0, 5.0, 6.0], [0.0, 1.0, 5.0, 6.0]], dtype=torch.float64)
    # across: 3 rows' column jump 4 (squared 16) and 4 columns' row edge (0); within: 3 rows × 2 pairs of
    # squared 1, and 4 columns × 1 pair of 0
    across = (3 * 16 + 4 * 0) / (3 + 4)
    within = (6 * 1 + 4 * 0) / (6 + 4)
    assert metrics.neighbour_jump_ratio(field, 2) == pytest.approx(across / within)
    # NaN pixels and their pairs are left out.
    holed = truth.clone()
    holed[0, 0, 5, 5] = float("nan")
    assert math.isfinite(metrics.patch_edge_ratio(blocky, holed, 4))
    with pytest.raises(ValueError, match="patch_size"):
        metrics.neighbour_jump_ratio(truth, 1)


def test_rank_histogram_flatness_against_scipy_chisquare():
    stats = pytest.importorskip("scipy.stats")
    counts = torch.tensor([30, 12, 10, 9, 11, 28])
    flat = metrics.rank_histogram_flatness(counts)
    assert flat["chi2"] == pytest.approx(float(stats.chisquare(counts.numpy()).statistic), rel=1e-12)
    assert flat["df"] == 5
    assert flat["reliability_index"] == pytest.approx(sum(abs(c / 100 - 1 / 6) for c in counts.tolist()))
    # A calibrated ensemble is flatter than an under-dispersed one.
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(20000, generator=g, dtype=torch.float64)
    good = torch.randn(9, 20000, generator=g, dtype=torch.float64)
    narrow = 0.5 * good
    ri = [metrics.rank_histogram_flatness(metrics.rank_histogram(m, obs))["reliability_index"] for m in (good, narrow)]
    assert ri[0] < 0.05 < 0.3 < ri[1]
    with pytest.raises(ValueError, match="counts must be"):
        metrics.rank_histogram_flatness(torch.tensor([3]))


def test_the_report_gives_the_errors_own_seams_beside_the_stds():
    """``error_seams``: the 4-pixel imprint of the RMS error per pixel over the fields (numpy
    by hand), the reference for ``std_seams`` where the input's cells make the error periodic."""
    from podiff.evaluation.report import evaluate

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(6, 1, 8, 12, generator=g, dtype=torch.float64)
    ramp = 1.0 + (torch.arange(12, dtype=torch.float64) % 4 == 0)  # errors twice as large on every 4th column
    mean = truth + ramp * torch.randn(6, 1, 8, 12, generator=g, dtype=torch.float64)
    result = evaluate(mean, torch.ones_like(mean), truth, torch.zeros(6, 1, 2, 3), scale=4, period=4)["model"]
    rms = np.sqrt(np.mean((mean - truth).numpy() ** 2, axis=0))[0]
    pattern = rms.reshape(2, 4, 3, 4).mean((0, 2))
    assert result["error_seams"] == pytest.approx(pattern.std() / pattern.mean(), rel=1e-10)
    assert result["error_seams"] > 0.2 and result["std_seams"] == 0.0  # a flat std misses the errors' seams
