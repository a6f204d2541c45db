"""The U-Net regression baseline (``baselines.unet``): any field size, learns what bicubic misses,
takes covariates, keeps masks, saves and continues."""

import pytest
import torch
import torch.nn.functional as F

from podiff.baselines import bicubic
from podiff.baselines.unet import UNet, UNetBaseline
from podiff.evaluation import metrics
from podiff.mean.ridge import RidgeBaseline


def fields(n=48, size=16, seed=0, k=7):
    """Smooth fields with a nonlinearity a linear map misses."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 2 * (k - 1), size + 2 * (k - 1), generator=g)
    hr = F.avg_pool2d(F.avg_pool2d(x, k, stride=1), k, stride=1) * k
    hr = hr + 0.3 * hr**2
    return F.avg_pool2d(hr, 4), hr


def test_the_unet_keeps_any_size():
    net = UNet(3, 2, width=8, depth=2)
    assert net(torch.randn(2, 3, 18, 27)).shape == (2, 2, 18, 27)
    assert float(net(torch.randn(1, 3, 8, 8)).detach().abs().max()) == 0.0  # zero head: starts at the bicubic field


def test_it_learns_what_bicubic_and_the_ridge_miss_and_round_trips(tmp_path):
    lr, hr = fields(140)
    train, val, test = slice(0, 100), slice(100, 120), slice(120, 140)
    unet = UNetBaseline(4, 1, width=8, depth=2).fit(lr[train], hr[train], validation=(lr[val], hr[val]), steps=200,
                                                    eval_every=25, learning_rate=3e-3)
    rmse_unet = metrics.rmse(unet.predict(lr[test]), hr[test])
    rmse_bicubic = metrics.rmse(bicubic(lr[test], 4), hr[test])
    rmse_ridge = metrics.rmse(RidgeBaseline(4).fit(lr[train], hr[train]).predict(lr[test]), hr[test])
    # measured: U-Net 0.127, ridge 0.134, bicubic 0.157
    assert rmse_unet < 0.85 * rmse_bicubic and rmse_unet < rmse_ridge, (rmse_unet, rmse_ridge, rmse_bicubic)
    assert unet.best_step is not None and unet.val_history
    unet.save(tmp_path / "unet.safetensors")
    back = UNetBaseline.load(tmp_path / "unet.safetensors")
    torch.testing.assert_close(back.predict(lr[test]), unet.predict(lr[test]))
    steps = back.steps
    back.continue_on(lr[:120], hr[:120], 5)
    assert back.steps == steps + 5 and back.steps_refit == 5


def test_covariates_masks_and_bad_input():
    lr, hr = fields(12)
    lr_cov = torch.cat([lr, torch.randn(12, 2, 4, 4)], 1)
    hr[:, :, :4, :4] = float("nan")
    lr = F.avg_pool2d(hr, 4)  # the masked block is NaN in the input too
    lr_cov[:, :1] = lr
    unet = UNetBaseline(4, 1, width=8).fit(lr_cov, hr, steps=3)
    pred = unet.predict(lr_cov)
    assert pred.shape == hr.shape and torch.isnan(pred[:, :, :4, :4]).all() and torch.isfinite(pred[:, :, 4:]).all()
    with pytest.raises(ValueError, match="lr must have 3 channels"):
        unet.predict(lr)
    with pytest.raises(ValueError, match="hr exactly 1"):
        UNetBaseline(4, 1).fit(lr_cov, torch.cat([hr, hr], 1), steps=1)
    with pytest.raises(RuntimeError, match="not fitted"):
        UNetBaseline(4, 1).predict(lr)


def test_the_position_embedding_learns_what_is_fixed_in_place():
    """A fine pattern fixed in place, invisible in the block means: only a U-Net that knows where it
    is can add it (CorrDiff's learned position channels)."""
    g = torch.Generator().manual_seed(1)
    lr, hr = fields(80, size=48, seed=1)  # wider than the receptive field: the borders do not place it
    pattern = torch.randn(1, 1, 48, 48, generator=g)
    pattern = pattern - F.interpolate(F.avg_pool2d(pattern, 4), scale_factor=4)  # zero block means
    hr = hr + 0.5 * pattern
    train, val, test = slice(0, 50), slice(50, 65), slice(65, 80)
    rmse = {}
    for channels in (0, 8):
        unet = UNetBaseline(4, 1, width=8, position_channels=channels).fit(
            lr[train], hr[train], validation=(lr[val], hr[val]), steps=300, eval_every=25, learning_rate=3e-3)
        rmse[channels] = metrics.rmse(unet.predict(lr[test]), hr[test])
    assert rmse[8] < 0.7 * rmse[0], rmse
    with pytest.raises(ValueError, match="48×48 grid it was trained on; got fields of 20×20"):
        unet.predict(torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="position_channels must be >= 0"):
        UNetBaseline(4, 1, position_channels=-1)


def test_fitting_leaves_the_callers_random_state_alone():
    lr, hr = fields(8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    UNetBaseline(4, 1, width=8).fit(lr, hr, steps=1)
    assert torch.equal(torch.rand(3), expected)
