"""Refitting on every field (``fitting.refit``): on a series with a trend the refitted model beats
the model fitted on the older fields only, and its calibrated intervals still cover."""

import copy

import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.diffusion.training import continuation_steps
from podiff.evaluation import metrics
from podiff.fitting import calibrate_spread, fit, refit
from podiff.fitting.refit import refit_error_ratio
from podiff.mean.ridge import RidgeBaseline


def trend_fields(n=48, size=16, seed=0):
    """Smooth weather plus a warming whose rate varies within each 4-pixel block: the coarse field
    shows that it warms, only the fields show where within a block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 6, size + 6, generator=g)
    weather = F.avg_pool2d(F.avg_pool2d(x, 4, stride=1), 4, stride=1) * 4
    pattern = 1 + 0.8 * torch.randn(1, 1, size, size, generator=g)
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    hr = weather + 0.08 * t * pattern
    return F.avg_pool2d(hr, 4), hr


def config():
    return PipelineConfig(residual="ridge", antithetic=False, scale=4, patch_size=4, rank=8,
                          denoiser=dict(width=32, depth=1, heads=2), batch_size=8, sample_steps=8, train_steps=300,
                          learning_rate=3e-3)


def test_continuation_steps_give_the_new_fields_the_chosen_steps_per_field():
    assert continuation_steps(300, 30, 6) == 60
    assert continuation_steps(301, 30, 6) == 61  # rounded up
    assert continuation_steps(300, 30, 0) == 0
    with pytest.raises(ValueError, match="n_train"):
        continuation_steps(300, 0, 6)


def test_refit_on_a_trend_beats_the_held_out_fit_and_keeps_its_coverage():
    lr, hr = trend_fields()
    train, val, test = slice(0, 32), slice(32, 40), slice(40, 48)
    pipe = PODiffPipeline(config())
    fit(pipe, lr[train], hr[train], validation=(lr[val], hr[val]), eval_every=25, patience=4, progress=False)
    calibrate_spread(pipe, lr[val], hr[val], seed=0, method="crps", shape="gaussian")
    held = copy.deepcopy(pipe)
    chosen = pipe.training.best_step
    info = refit(pipe, lr[train], hr[train], (lr[val], hr[val]), progress=False)
    assert (info["from_step"], info["steps"], info["fields"]) == (held.training.step,
                                                                  continuation_steps(chosen, 32, 8), 40)
    assert pipe.training.refit == info and pipe.training.step == held.training.step + info["steps"]
    assert pipe.mean_model.choice["refitted_fields"] == 40
    assert pipe.mean_model.ridge.settings() == held.mean_model.ridge.settings()  # the choice is kept
    # calibrated on the held-out errors before the refit, then narrowed by the refit's error ratio
    ratio, _ = refit_error_ratio(lr[train], hr[train], (lr[val], hr[val]), held.mean_model.ridge)
    assert info["spread_ratio"] == ratio < 0.9 and info["held_out_spread"] == held.calibration.spread
    assert pipe.calibration.spread == pytest.approx(held.calibration.spread * ratio, rel=1e-12)

    scores = {}
    for name, model in (("held", held), ("refit", pipe)):
        out = model.sample(lr[test], num_samples=16, seed=1)
        coverage = metrics.coverage_gaussian(out.mean, out.variance, hr[test])
        scores[name] = (metrics.rmse(out.mean, hr[test]), coverage[0.9])
    # the held-out fit extrapolates the warming's fine pattern from older fields; the refit has seen
    # the most recent ones (measured: RMSE 0.546 → 0.400, 90 % coverage 0.855 → 0.939)
    assert scores["refit"][0] < 0.8 * scores["held"][0], scores
    assert 0.85 <= scores["refit"][1] <= 0.95, scores


def test_refit_is_saved_and_resumes_from_its_checkpoint(tmp_path):
    lr, hr = trend_fields(24)
    pipe = PODiffPipeline(config())
    fit(pipe, lr[:16], hr[:16], validation=(lr[16:], hr[16:]), steps=40, eval_every=20, progress=False)
    twin = copy.deepcopy(pipe)
    info = refit(pipe, lr[:16], hr[:16], (lr[16:], hr[16:]), steps=6, progress=False,
                 checkpoint=tmp_path / "refit.pt")
    pipe.save(tmp_path / "model")
    loaded = PODiffPipeline.load(tmp_path / "model")
    assert loaded.training.refit == info
    assert (info["from_step"], info["steps"], info["fields"]) == (40, 6, 24)
    # resuming a finished continuation from its checkpoint changes nothing
    again = refit(twin, lr[:16], hr[:16], (lr[16:], hr[16:]), steps=6, progress=False,
                  checkpoint=tmp_path / "refit.pt")
    assert again == info and twin.calibration == pipe.calibration
    # a second refit of the refitted model starts from the held-out spread: the ratio is not compounded
    refit(pipe, lr[:16], hr[:16], (lr[16:], hr[16:]), steps=0, progress=False)
    assert pipe.calibration.spread == twin.calibration.spread
    for a, b in zip(twin.ema.parameters(), pipe.ema.parameters(), strict=True):
        assert torch.equal(a, b)


def test_refit_needs_a_trained_model_and_its_held_out_fields():
    lr, hr = trend_fields(12)
    with pytest.raises(RuntimeError, match="fit it"):
        refit(PODiffPipeline(config()), lr, hr, (lr, hr))
    pipe = PODiffPipeline(config())
    fit(pipe, lr[:8], hr[:8], steps=2, progress=False)
    with pytest.raises(ValueError, match="held_out"):
        refit(pipe, lr[:8], hr[:8], (None, None))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        refit(pipe, lr[:8], hr[:8], (lr[8:], hr[8:]), steps=-1)


def test_refit_error_ratio_foresees_how_much_the_refit_cuts_the_error_that_follows():
    """Measured one period back, the ratio matches the one the refit realises on later fields."""
    lr, hr = trend_fields(64)
    train, val, test = slice(0, 40), slice(40, 48), slice(48, 64)
    held = RidgeBaseline(4).fit(lr[train].double(), hr[train].double())
    ratio, about = refit_error_ratio(lr[train], hr[train], (lr[val], hr[val]), held)
    both = RidgeBaseline(4).fit(lr[:48].double(), hr[:48].double())
    realised = (metrics.rmse(both.predict(lr[test].double()), hr[test].double())
                / metrics.rmse(held.predict(lr[test].double()), hr[test].double()))
    assert about["older_fields"] == 32 and about["ratio"] == ratio
    assert ratio == pytest.approx(about["rmse_recent"] / about["rmse_older"])
    assert ratio < 0.95 and realised < 0.95 and abs(ratio - realised) < 0.1, (ratio, realised)
    # no trend: the recent fields add little, the ratio stays near 1
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    flat_lr = F.avg_pool2d(x, 4)
    flat = RidgeBaseline(4).fit(flat_lr[train].double(), x[train].double())
    assert 0.9 < refit_error_ratio(flat_lr[train], x[train], (flat_lr[val], x[val]), flat)[0] < 1.1
    # too few older fields: 1, and why
    ratio, about = refit_error_ratio(lr[:10], hr[:10], (lr[10:16], hr[10:16]), held)
    assert ratio == 1.0 and "too few" in about["skipped"]
