"""Members drawn on several patch grids (``PipelineConfig.member_grids``): the fitted grid and grids
shifted by half a patch, each padded past the field's edge with NaN, an equal share of the members
on each; the pixel mean and variance are the pooled members' (the law of total variance over each
grid's closed-form moments), exact as on one grid."""

from dataclasses import replace

import pytest
import torch
from utils import smooth_pairs

from podiff import PipelineConfig, PODiffPipeline
from podiff.fitting import fit
from podiff.latent.windows import TrainingWindows, crop_field, member_windows

N, H, W, S = 16, 16, 24, 4


def fields(n=N, seed=0, land=False):
    return smooth_pairs(n, (H, W), S, seed, land)


def config(**kw):
    return PipelineConfig(**{**dict(residual="none", antithetic=False, scale=S, patch_size=4, rank=12, basis="shared",
                                    grid_shifts=True, member_grids=4, denoiser=dict(width=16, depth=2, heads=2),
                                    batch_size=4, sample_steps=3, train_steps=10, learning_rate=3e-3), **kw})


def trained(lr, hr, **kw):
    pipe = PODiffPipeline(config(**kw))
    fit(pipe, lr, hr, progress=False)
    return pipe


def pooled(samples):
    """The members' mean and unbiased variance, in float64."""
    x = samples.double()
    return x.mean(0), x.var(0, unbiased=True)


def test_member_windows_are_the_fitted_grid_and_half_patch_shifts_that_training_draws():
    assert member_windows((4, 6), 4, 1) == [(0, 0)]
    assert member_windows((4, 6), 4, 2) == [(0, 0), (-2, -2)]
    assert member_windows((4, 6), 4, 4) == [(0, 0), (-2, 0), (0, -2), (-2, -2)]
    assert member_windows((1, 6), 4, 4) == [(0, 0), (0, 0), (0, -2), (0, -2)]  # no shift along one patch
    windows = TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), shifts=True)
    for window in member_windows((4, 6), 4, 4):  # each a window the denoiser trained on
        assert windows.geometry(window)["grid"] == (4 + (window[0] < 0), 6 + (window[1] < 0))
    every = member_windows((4, 6), 4, 16)  # every pixel offset of a 4-pixel patch
    assert len(set(every)) == 16 and every[0] == (0, 0) and {dy for dy, _ in every} == {0, -1, -2, -3}
    assert member_windows((4, 6), 8, 16)[:4] == [(0, 0), (0, -2), (0, -4), (0, -6)]
    with pytest.raises(ValueError, match="count must be 1, 2, 4 or 16 grids; got 3"):
        member_windows((4, 6), 4, 3)
    with pytest.raises(ValueError, match="patch must be a multiple of 4; got 6"):
        member_windows((4, 6), 6, 16)
    with pytest.raises(ValueError, match=r"member_grids must be one of \(1, 2, 4, 16\); got 3"):
        PipelineConfig(member_grids=3)


@pytest.mark.parametrize("kw", [{}, {"residual": "ridge"}, {"land": True}, {"covariates": True},
                                {"member_grids": 16, "antithetic": True}],
                         ids=["field", "residual-ridge", "land", "covariates", "sixteen-grids"])
def test_the_closed_form_moments_are_the_pooled_members_of_every_grid(kw):
    lr, hr = fields(land=kw.get("land", False))
    settings = {k: v for k, v in kw.items() if k not in ("land", "covariates")}
    if kw.get("covariates"):
        g = torch.Generator().manual_seed(3)
        lr = torch.cat([lr, torch.randn(N, 1, H // S, W // S, generator=g)], 1)
        settings["covariates"] = ["a"]
    pipe = trained(lr[:12], hr[:12], **settings)
    members = 32 if kw.get("member_grids") == 16 else 8
    out = pipe.sample(lr[12:], members, seed=2, return_samples=True)
    assert out.samples.shape == (members, 4, 1, H, W) and out.tokens is None
    mean, var = pooled(out.samples)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(out.variance.double(), var, rtol=1e-3, atol=1e-5, equal_nan=True)
    assert torch.isfinite(out.mean).all() != kw.get("land", False)  # land: NaN, as on one grid
    valid = ~torch.isnan(hr[12:])
    assert torch.isfinite(out.mean[valid]).all() and (out.variance[valid] > 0).all()


def test_the_first_grids_members_are_the_one_grid_models_and_the_others_differ():
    lr, hr = fields()
    pipe = trained(lr[:12], hr[:12])
    mixed = pipe.sample(lr[12:], 8, seed=5, return_samples=True).samples
    one = replace(pipe.config, member_grids=1)
    pipe.config = one
    single = pipe.sample(lr[12:], 8, seed=5, return_samples=True).samples
    torch.testing.assert_close(mixed[:2], single[:2], rtol=0, atol=0)  # the same seeds on the fitted grid
    assert not torch.allclose(mixed[2:], single[2:])  # drawn on other grids


def test_each_share_of_members_lies_on_its_own_grids_patches():
    """A member of grid ``(top, left)`` is a sum of basis patches on that grid: projected onto its
    whole patches (rank 12 of 16) it is unchanged, onto the fitted grid's it is not."""
    lr, hr = fields()
    pipe = trained(lr[:12], hr[:12])
    samples = pipe.sample(lr[12:], 8, seed=1, return_samples=True).samples
    std = pipe.standardise(samples.flatten(0, 1))

    def residual_on(grid_window, x):
        top, left = grid_window
        rows, cols = slice(top, top + H + 4 * (top < 0)), slice(left, left + W + 4 * (left < 0))
        padded = crop_field(x, rows, cols)
        pod = pipe.pod.on_domain(tuple(padded.shape[-2:]), ~torch.isnan(padded[0]))
        back = pod.decode(pod.encode(padded), image_size=tuple(padded.shape[-2:]))
        error = (back - padded)[..., -top : -top + H, -left : -left + W]
        # the whole patches: a half patch at an edge is gappy-encoded (regularised), not exactly
        return error[..., -top : H + top, -left : W + left].abs().amax((1, 2, 3))

    per_member = std.view(8, 4, 1, H, W)
    for k, window in enumerate(member_windows(pipe.pod.grid, 4, 4)):
        share = per_member[2 * k : 2 * k + 2].flatten(0, 1)
        assert residual_on(window, share).max() < 1e-4, window
        if window != (0, 0):
            assert residual_on((0, 0), share).min() > 1e-2, window  # not the fitted grid's patches


def test_member_grids_refuse_a_local_basis_and_uneven_shares():
    assert PipelineConfig(member_grids=2).resolved_basis == PipelineConfig(grid_shifts=True).resolved_basis == "shared"
    assert PipelineConfig().resolved_basis == "auto"  # chosen on held-out fields
    with pytest.raises(ValueError, match="member_grids=2 draws members on shifted patch grids, which needs a shared "
                                         "basis without overlap; got basis='local'"):
        PipelineConfig(member_grids=2, basis="local")
    with pytest.raises(ValueError, match="got stride=2 < patch_size=4"):
        PipelineConfig(member_grids=4, stride=2)
    lr, hr = fields()
    local = trained(lr[:12], hr[:12], basis="local", grid_shifts=False, member_grids=1, train_steps=2)
    local.config = replace(local.config, basis="auto", member_grids=4)  # e.g. sample --member-grids 4
    with pytest.raises(ValueError, match="needs a shared POD basis without overlap; this model has a local basis"):
        local.sample(lr[12:], 8)
    pipe = trained(lr[:12], hr[:12], train_steps=2)
    with pytest.raises(ValueError, match="num_samples must be a multiple of member_grids=4 with at least 2 members "
                                         "per grid; got 6"):
        pipe.sample(lr[12:], 6)
    with pytest.raises(ValueError, match="got 4"):
        pipe.sample(lr[12:], 4)


def test_member_grids_survive_save_and_load(tmp_path):
    lr, hr = fields()
    pipe = trained(lr[:12], hr[:12], train_steps=2)
    pipe.save(tmp_path / "model")
    again = PODiffPipeline.load(tmp_path / "model")
    assert again.config.member_grids == 4
    a, b = pipe.sample(lr[12:], 8, seed=3), again.sample(lr[12:], 8, seed=3)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.variance, b.variance)


def test_the_spread_is_calibrated_on_every_member_grid():
    from podiff.fitting import calibrate_spread

    lr, hr = fields()
    pipe = trained(lr[:12], hr[:12], member_grids=16, train_steps=2)
    k, ensemble = calibrate_spread(pipe, lr[12:], hr[12:], seed=0, return_ensemble=True)  # 2 on each grid
    assert ensemble.samples.shape[0] == 32 and 0.5 <= k <= 2.0 and pipe.calibration.spread == k
    with pytest.raises(ValueError, match="method 'modes' scales each POD mode of one grid's tokens"):
        calibrate_spread(pipe, lr[12:], hr[12:], method="modes")
