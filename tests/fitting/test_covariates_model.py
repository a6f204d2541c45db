"""A model with covariates (``PipelineConfig.covariates``): the mean model regresses on them and the
denoiser is conditioned on them; where the fine structure depends on a predictor, the model with it
beats the model without; saved and loaded, it samples the same; a wrong input is a clear error."""

import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.evaluation import metrics
from podiff.fitting import fit
from podiff.mean.ridge import RidgeBaseline


def fields(n=48, size=16, seed=0):
    """A fine pattern whose sign and strength follow a predictor ``a`` that the coarse field barely shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 6, size + 6, generator=g)
    weather = F.avg_pool2d(F.avg_pool2d(x, 4, stride=1), 4, stride=1) * 4
    pattern = torch.randn(1, 1, size, size, generator=g)
    pattern = pattern - F.interpolate(F.avg_pool2d(pattern, 4), scale_factor=4)  # invisible in block means
    a = torch.rand(n, generator=g) * 2 - 1
    hr = weather + 1.5 * a.view(n, 1, 1, 1) * pattern
    lr = F.avg_pool2d(hr, 4)
    return lr, hr, a.view(n, 1, 1, 1).expand(n, 1, size // 4, size // 4).contiguous()


def config(**kw):
    return PipelineConfig(**{**dict(residual="ridge", antithetic=False, scale=4, patch_size=4, rank=10,
                                    denoiser=dict(width=32, depth=1, heads=2), batch_size=8, sample_steps=6,
                                    train_steps=40, learning_rate=3e-3), **kw})


def test_the_ridge_uses_covariates_at_the_blocks_own_cell():
    lr, hr, a = fields()
    with_a = torch.cat([lr, a], 1)
    plain = RidgeBaseline(4, per_location=True).fit(lr[:32], hr[:32])
    ridge = RidgeBaseline(4, per_location=True, covariates=1).fit(with_a[:32], hr[:32])
    assert ridge.settings()["covariates"] == 1 and ridge.weights.shape[-1] == 5 * 5 + 1 + 1
    assert ridge.predict(with_a[32:]).shape == hr[32:].shape
    rmse_plain = metrics.rmse(plain.predict(lr[32:]), hr[32:])
    rmse_cov = metrics.rmse(ridge.predict(with_a[32:]), hr[32:])
    assert rmse_cov < 0.5 * rmse_plain, (rmse_cov, rmse_plain)
    with pytest.raises(ValueError, match="with 1 covariates it needs at least 2"):
        ridge.predict(a)


def test_a_predictor_that_matters_makes_the_model_better_and_the_model_round_trips(tmp_path):
    lr, hr, a = fields()
    train, val, test = slice(0, 32), slice(32, 40), slice(40, 48)
    with_a = torch.cat([lr, a], 1)
    scores = {}
    for name, inputs, cfg in (("without", lr, config()), ("with", with_a, config(covariates=["a"]))):
        pipe = PODiffPipeline(cfg)
        fit(pipe, inputs[train], hr[train], validation=(inputs[val], hr[val]), eval_every=20, progress=False)
        out = pipe.sample(inputs[test], num_samples=4, seed=0)
        scores[name] = metrics.rmse(out.mean, hr[test])
    assert scores["with"] < 0.5 * scores["without"], scores
    assert pipe.denoiser.config.cond_rank == pipe.pod.rank + 1  # one covariate, one input cell per token
    pipe.save(tmp_path / "model")
    loaded = PODiffPipeline.load(tmp_path / "model")
    assert loaded.config.covariates == ["a"]
    torch.testing.assert_close(loaded.sample(with_a[test], num_samples=4, seed=0).mean, out.mean)
    with pytest.raises(ValueError, match=r"lr must be \[B, 2, 4, 4\] .*covariates \['a'\]"):
        loaded.sample(lr[test], num_samples=4)
    with pytest.raises(ValueError, match="the 1 covariate channels"):
        fit(PODiffPipeline(config(covariates=["a"])), lr[train], hr[train], progress=False)
