"""Training that generalises: the validation loss, the best weights kept, early stopping, resume;
the POD chosen on held-out fields; residual diffusion over a tuned ridge and the regression ViT."""

import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.baselines import bicubic
from podiff.baselines.regression import RegressionBaseline
from podiff.diffusion.training import Trainer
from podiff.evaluation import metrics
from podiff.fitting import build, calibrate_spread, fit
from podiff.latent.pod_selection import held_out_energy, select_pod
from podiff.model.state import Calibration


def fields(n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 6, size + 6, generator=g)
    hr = F.avg_pool2d(F.avg_pool2d(x, 4, stride=1), 4, stride=1) * 4
    return F.avg_pool2d(hr, 4), hr


def config(**kw):
    return PipelineConfig(**{**dict(residual="none", antithetic=False, scale=4, patch_size=4, rank=6,
                                    denoiser=dict(width=16, depth=1, heads=2),
                                    batch_size=8, sample_steps=4, train_steps=40, learning_rate=3e-3), **kw})


def test_best_validation_weights_are_kept_and_training_stops_early():
    lr, hr = fields(24)
    # a high rate: the loss soon stops improving
    pipe = PODiffPipeline(config(train_steps=400, learning_rate=3e-2, warmup=1))
    fit(pipe, lr, hr, validation=0.25, eval_every=5, patience=3, progress=False)
    steps = [s for s, _ in pipe.training.val_history]
    assert steps == list(range(5, pipe.training.step + 1, 5))
    assert pipe.training.step < 400  # stopped early: three evaluations without improvement
    best_step, best_loss = min(pipe.training.val_history, key=lambda v: v[1])
    assert pipe.training.best_step == best_step and pipe.training.step - best_step == 15
    # The weights in place are the best evaluation's: their validation loss is the best loss.
    x0, cond = pipe.target_tokens(hr[18:]).float(), pipe.condition_tokens(lr[18:]).float()
    assert Trainer(pipe).validation_loss(x0, cond) == pytest.approx(best_loss, rel=1e-6)
    assert pipe.training.val_history[-1][1] > best_loss


def test_validation_fraction_holds_out_the_last_fields_from_every_fit():
    lr, hr = fields(20)
    hr_changed = hr.clone()
    hr_changed[15:] += 100.0  # only the held-out fields change
    a, b = (PODiffPipeline(config(train_steps=2)) for _ in range(2))
    fit(a, lr, hr, validation=0.25, progress=False)
    fit(b, lr, hr_changed, validation=0.25, progress=False)
    assert torch.equal(a.offset, b.offset) and torch.equal(a.pod.basis, b.pod.basis)
    with pytest.raises(ValueError, match="validation must be"):
        fit(PODiffPipeline(config()), lr, hr, validation=1.5, progress=False)
    with pytest.raises(ValueError, match="leaves 1 to train on"):
        fit(PODiffPipeline(config()), lr[:4], hr[:4], validation=0.7, progress=False)


def test_resume_continues_the_validation_history(tmp_path):
    lr, hr = fields(16)
    whole = PODiffPipeline(config(train_steps=30))
    fit(whole, lr, hr, validation=0.25, eval_every=10, patience=None, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    part = PODiffPipeline(config(train_steps=30))
    fit(part, lr, hr, validation=0.25, eval_every=10, patience=None, steps=20, checkpoint=ckpt,
             checkpoint_every=10, progress=False)
    resumed = PODiffPipeline(config(train_steps=30))
    fit(resumed, lr, hr, validation=0.25, eval_every=10, patience=None, checkpoint=ckpt, progress=False)
    assert [s for s, _ in resumed.training.val_history] == [10, 20, 30]
    for (s1, v1), (s2, v2) in zip(whole.training.val_history, resumed.training.val_history, strict=False):
        assert s1 == s2 and v1 == pytest.approx(v2, rel=1e-4)


def test_pod_selection_prefers_local_for_location_dependent_fields_and_shared_otherwise():
    _, stationary = fields(40, seed=1, size=16)
    g = torch.Generator().manual_seed(2)
    # A strong fixed pattern per location whose amplitude varies: a local basis captures it in one mode.
    pattern = torch.randn(1, 1, 16, 16, generator=g)
    amplitude = torch.randn(40, 1, 1, 1, generator=g)
    located = amplitude * pattern + 0.01 * stationary
    for data, expected in ((stationary, "shared"), (located, "local")):
        pod, choice = select_pod(data[:30], data[30:], patch_size=4, energy=0.99)
        assert choice["basis"] == expected, choice
        shares = held_out_energy(pod, data[30:])
        assert shares[-1] == pytest.approx(choice["held_out_energy"]) and shares[-1] >= 0.99
        assert choice["rank"] == 1 or shares[-2] < 0.99  # the fewest modes that reach it
    assert choice["candidates"]["local"]["rank"] < choice["candidates"]["shared"]["rank"]


def test_pod_selection_prefers_the_basis_that_reaches_the_target_at_equal_rank():
    """Both at full rank, only one reaching the energy: that one, not the tie-break's shared."""
    from podiff.latent.pod_selection import preferred

    both_full = {"shared": {"rank": 16, "held_out_energy": 0.9965}, "local": {"rank": 16, "held_out_energy": 1.0}}
    assert preferred(both_full, 0.999) == "local"
    tie = {"shared": {"rank": 5, "held_out_energy": 0.9992}, "local": {"rank": 5, "held_out_energy": 0.9995}}
    assert preferred(tie, 0.999) == "shared"
    fewer = {"shared": {"rank": 7, "held_out_energy": 0.9991}, "local": {"rank": 5, "held_out_energy": 0.9990}}
    assert preferred(fewer, 0.999) == "local"
    neither = {"shared": {"rank": 16, "held_out_energy": 0.99}, "local": {"rank": 16, "held_out_energy": 0.98}}
    assert preferred(neither, 0.999) == "shared"
    assert preferred(both_full, 0.999, fixed_rank=True) == "local"  # a fixed rank: the better energy

def test_residual_pipeline_adds_the_tuned_ridge_and_learns_out_of_fold_residuals(tmp_path):
    lr, hr = fields(40, seed=3)
    pipe = PODiffPipeline(config(residual="ridge", rank=None, train_steps=60))
    fit(pipe, lr[:32], hr[:32], validation=0.25, eval_every=20, progress=False)
    assert pipe.mean_model.choice["tuned_on_validation"]
    ridge = pipe.mean_model.ridge
    # Out-of-fold predictions of the training fields are worse than in-sample ones: test-like errors.
    rmse = lambda p, t: metrics.rmse(p, t)  # noqa: E731
    oof = pipe.mean_model.out_of_fold(lr[:24], hr[:24])
    assert rmse(oof, hr[:24]) > rmse(ridge.predict(lr[:24]), hr[:24])
    out = pipe.sample(lr[32:], num_samples=8, return_samples=True)
    prediction = ridge.predict(lr[32:])
    torch.testing.assert_close(out.mean, out.samples.mean(0), rtol=1e-4, atol=1e-5)
    residual_mean = out.mean - prediction
    assert float(residual_mean.abs().mean()) < 0.5 * rmse(prediction, hr[32:])  # a correction, not a new field
    assert rmse(out.mean, hr[32:]) < rmse(bicubic(lr[32:], 4), hr[32:])
    pipe.save(tmp_path / "m")
    again = PODiffPipeline.load(tmp_path / "m").sample(lr[32:], num_samples=8)
    torch.testing.assert_close(again.mean, out.mean)
    reg = RegressionBaseline(pipe).fit(lr[:24], hr[:24], (lr[24:32], hr[24:32]), steps=40, eval_every=10)
    assert reg.best_step is not None and reg.predict(lr[32:]).shape == hr[32:].shape
    reg.save(tmp_path / "reg.safetensors")
    loaded = RegressionBaseline.load(tmp_path / "reg.safetensors", pipe)
    torch.testing.assert_close(loaded.predict(lr[32:]), reg.predict(lr[32:]))


def test_residual_condition_tokens_have_unit_rms_and_detail_ignores_the_level():
    """The anomaly condition is scaled to unit RMS per mode over the training fields' out-of-fold
    predictions (it was not: the training mean was taken off twice); the detail condition does
    not move when the mean model's prediction warms by the same amount everywhere, the anomaly
    one does."""
    lr, hr = fields(40, seed=5)
    tokens = {}
    for condition in ("anomaly", "detail"):
        pipe = PODiffPipeline(config(residual="ridge", condition=condition, train_steps=0))
        fit(pipe, lr[:32], hr[:32], validation=0.25, progress=False)
        oof = pipe.mean_model.out_of_fold(lr[:24], hr[:24])
        rms = pipe.condition_tokens(lr[:24], oof).double().square().mean((0, 1)).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=0)
        mu = pipe.mean_model.predict(lr[32:])
        warm = pipe.condition_tokens(lr[32:], mu + 3.0) - pipe.condition_tokens(lr[32:], mu)
        tokens[condition] = float(warm.abs().max())
    assert tokens["detail"] < 1e-4 < 0.01 < tokens["anomaly"], tokens


def test_antithetic_members_run_mirrored_chains():
    """Member 2k+1 starts from member 2k's noise negated; with the untrained (zero-head) denoiser the
    DDIM chain is linear, so the pair's tokens are exact negatives and their mean is zero."""
    lr, hr = fields(12)
    pipe = build(PODiffPipeline(config(antithetic=True)), lr, hr)
    cond = pipe.condition_tokens(lr[:2]).float()
    tokens = pipe.sample_tokens(cond, num_samples=4, steps=3)
    torch.testing.assert_close(tokens[1], -tokens[0])
    torch.testing.assert_close(tokens[3], -tokens[2])
    assert not torch.allclose(tokens[2], tokens[0])  # pairs differ from each other
    plain = build(PODiffPipeline(config()), lr, hr).sample_tokens(cond, num_samples=4, steps=3)
    torch.testing.assert_close(plain[0], tokens[0])  # the first of a pair is the plain member 0


def test_calibrated_spread_matches_the_validation_error():
    lr, hr = fields(24, seed=6)
    pipe = PODiffPipeline(config(train_steps=30))
    fit(pipe, lr[:18], hr[:18], progress=False)
    spread = calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, limits=(0.01, 100.0), method="moments")
    out = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True)
    mse = float((out.mean - hr[18:]).square().mean())
    assert float(out.variance.mean()) == pytest.approx(mse, rel=1e-4)  # the moment matched
    pipe.calibration.spread = 1.0
    assert float(pipe.sample(lr[18:], num_samples=8, seed=3).variance.mean()) == pytest.approx(
        float(out.variance.mean()) / spread**2, rel=1e-4)
    with pytest.raises(ValueError, match="spread must be a finite number > 0"):
        Calibration(spread=0)
    # "crps" minimises the validation CRPS of the scaled Gaussian predictive
    k = calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, limits=(0.01, 100.0), method="crps")
    assert pipe.calibration.spread == k
    pipe.calibration.spread = 1.0
    base = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True)
    crps = lambda s: metrics.crps_gaussian(base.mean, s * s * base.variance, hr[18:])  # noqa: E731
    assert crps(k) <= min(crps(1.02 * k), crps(k / 1.02))
    # the default, "members", minimises the fair CRPS of the members it scales
    k = calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, limits=(0.01, 100.0))
    scaled = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True).samples
    centre = base.samples.mean(0)
    torch.testing.assert_close(scaled, centre + k * (base.samples - centre), rtol=1e-4, atol=1e-5)
    fair = lambda s: metrics.crps_ensemble(centre + s * (base.samples - centre), hr[18:], fair=True)  # noqa: E731
    assert fair(k) <= min(fair(1.02 * k), fair(k / 1.02))
    # return_ensemble: the validation members as the calibrated model now draws them (no second draw)
    pipe.calibration.spread = 1.0
    k2, ensemble = calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, limits=(0.01, 100.0),
                                    return_ensemble=True)
    assert k2 == k
    again = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True)
    for name in ("samples", "mean", "variance"):
        torch.testing.assert_close(getattr(ensemble, name), getattr(again, name), rtol=1e-4, atol=1e-5)
    pipe.calibration.spread = 1.0
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate_spread(pipe, lr[18:], hr[18:], method="mse")

    # per-mode factors scale each mode's token deviations; the pixel variance follows in closed form
    plain = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True)
    r = plain.tokens.shape[-1]
    pipe.calibration.mode_spread = [1.0 + 0.5 * j for j in range(r)]
    scaled = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True)
    factors = torch.tensor(pipe.calibration.mode_spread)
    centre = plain.tokens.mean(0)
    torch.testing.assert_close(scaled.tokens - centre, (plain.tokens - centre) * factors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.mean, plain.mean)
    decoded_var = scaled.samples.var(0)  # members' own variance = the block variance (stride = patch)
    torch.testing.assert_close(scaled.variance, decoded_var, rtol=1e-3, atol=1e-7)
    pipe.calibration.mode_spread = [1.0] * (r + 1)
    with pytest.raises(ValueError, match=f"holds {r + 1} factors; the POD has {r} modes"):
        pipe.sample(lr[18:], num_samples=2)
    with pytest.raises(ValueError, match="mode_spread must be None or a list of finite factors > 0"):
        Calibration(mode_spread=[1.0, -1.0])

    # "modes": each mode's factor minimises the CRPS of its validation tokens, then k on top
    k = calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, method="modes")
    modes = pipe.calibration.mode_spread
    assert len(modes) == r and pipe.calibration.spread == k
    pipe.calibration.spread, pipe.calibration.mode_spread = 1.0, None
    raw = pipe.sample(lr[18:], num_samples=8, seed=3, return_samples=True).tokens
    truth = pipe.target_tokens(hr[18:], lr[18:])
    for j in (0, r - 1):
        m, v, y = raw[..., j].mean(0), raw[..., j].var(0), truth[..., j]
        def score(f, m=m, v=v, y=y):
            return metrics.crps_gaussian(m, f * f * v, y)

        assert 0.25 <= modes[j] <= 4.0
        if 0.25 < modes[j] < 4.0:
            assert score(modes[j]) <= min(score(1.02 * modes[j]), score(modes[j] / 1.02))
    pipe.calibration.mode_spread = modes
    on_top = pipe.sample(lr[18:], num_samples=8, seed=3)
    pixel = lambda f: metrics.crps_gaussian(on_top.mean, f * f * on_top.variance, hr[18:])  # noqa: E731
    assert pixel(k) <= min(pixel(1.02 * k), pixel(k / 1.02))
    with tempfile.TemporaryDirectory() as folder:  # the factors are part of the saved model
        pipe.calibration.spread = k
        pipe.save(folder)
        again = PODiffPipeline.load(folder)
        assert again.calibration.mode_spread == modes and again.calibration.spread == k


def test_calibration_learns_the_error_shape_on_the_validation_fields():
    from podiff.evaluation import error_shape

    lr, hr = fields(24, seed=6)
    pipe = PODiffPipeline(config(train_steps=30))
    fit(pipe, lr[:18], hr[:18], progress=False)
    k = calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, bands=1)
    quantiles = pipe.calibration.error_quantiles
    assert len(quantiles) == error_shape.QUANTILE_COUNT and pipe.calibration.error_band_edges is None
    calibrated = pipe.sample(lr[18:], num_samples=8, seed=3)  # the same draw, scaled by k
    assert quantiles == pytest.approx(error_shape.fit_error_quantiles(calibrated.mean, calibrated.variance, hr[18:]),
                                      rel=1e-4, abs=1e-6)
    # on the fields it was fitted to, the shape's intervals cover their levels
    cov = error_shape.coverage(calibrated.mean, calibrated.variance, hr[18:], quantiles)
    assert metrics.mace(cov) < 0.01, cov
    assert calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3, shape="gaussian") == k
    assert pipe.calibration.error_quantiles is None and pipe.calibration.error_band_edges is None
    with pytest.raises(ValueError, match="shape must be one of \\('validation', 'gaussian'\\); got 'student'"):
        calibrate_spread(pipe, lr[18:], hr[18:], shape="student")
    with pytest.raises(ValueError, match="bands must be an integer >= 1; got 0"):
        calibrate_spread(pipe, lr[18:], hr[18:], bands=0)
    # the default: one shape per equal-count band of the predicted mean
    assert calibrate_spread(pipe, lr[18:], hr[18:], num_samples=8, seed=3) == k
    banded, edges = pipe.calibration.error_quantiles, pipe.calibration.error_band_edges
    mean, var, truth = calibrated.mean, calibrated.variance, hr[18:]
    assert len(banded) == error_shape.ERROR_BANDS and len(edges) == 1 and len(edges[0]) == error_shape.ERROR_BANDS - 1
    np.testing.assert_allclose(edges[0], np.quantile(mean.double().numpy(), [0.2, 0.4, 0.6, 0.8]), rtol=1e-5)
    band = torch.bucketize(mean.double(), torch.tensor(edges[0], dtype=torch.float64), right=True)
    for b in (0, 4):
        assert banded[b] == pytest.approx(error_shape.fit_error_quantiles(mean, var, truth, mask=band == b),
                                          rel=1e-4, abs=1e-6)
    cov = error_shape.coverage(mean, var, truth, banded, edges=edges)
    assert metrics.mace(cov) < 0.01, cov
    with tempfile.TemporaryDirectory() as folder:  # the shape is part of the saved model
        pipe.save(folder)
        loaded = PODiffPipeline.load(folder).calibration
        assert loaded.error_quantiles == banded and loaded.error_band_edges == edges
    pipe.calibration.error_quantiles, pipe.calibration.error_band_edges = quantiles, None
    with tempfile.TemporaryDirectory() as folder:
        pipe.save(folder)
        assert PODiffPipeline.load(folder).calibration.error_quantiles == quantiles
