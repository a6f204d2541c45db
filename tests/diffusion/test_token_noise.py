"""Grid-correlated diffusion noise (``podiff.diffusion.token_noise``): the colouring's covariance is the
separable AR(1) correlation exactly; ``fit`` recovers it and ignores invalid tokens; samplers
driven by the coloured noise with the exact denoiser of matching Gaussian tokens reproduce the
correlation (white noise does not); a pipeline measures it, keeps it through save/load, and a
model saved before it existed samples with white noise."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from podiff import PipelineConfig, PODiffPipeline
from podiff.diffusion.sampling import DiffusionScheduler, RowNoise
from podiff.diffusion.schedules import CosineSchedule
from podiff.diffusion.token_noise import LIMIT, GridCorrelation, ar1_cholesky
from podiff.fitting import fit, training_noise


@pytest.mark.parametrize("rho", [0.0, 0.6, -0.5, LIMIT])
def test_ar1_factor_is_the_cholesky_factor_of_the_toeplitz_correlation(rho):
    n = 7
    reference = np.linalg.cholesky(scipy.linalg.toeplitz(rho ** np.arange(n)))
    factor = ar1_cholesky(torch.tensor([rho], dtype=torch.float64), n)[0].numpy()
    np.testing.assert_allclose(factor, reference, atol=1e-12)


def test_colouring_covariance_is_the_separable_correlation_exactly():
    """The map is linear: its covariance is M Mᵀ with M the images of the unit vectors."""
    rho_y, rho_x, grid = torch.tensor([0.6, -0.4, 0.0]), torch.tensor([-0.3, 0.8, 0.5]), (3, 4)
    noise = GridCorrelation(rho_y, rho_x, grid)
    L, r = 12, 3
    basis = torch.eye(L * r, dtype=torch.float64).view(L * r, L, r)
    images = noise(basis).reshape(L * r, L * r)  # row k: the noise for unit vector k
    cov = images.T @ images
    for j in range(r):
        ry = scipy.linalg.toeplitz(float(rho_y[j]) ** np.arange(grid[0]))
        rx = scipy.linalg.toeplitz(float(rho_x[j]) ** np.arange(grid[1]))
        block = cov.view(L, r, L, r)[:, j, :, j].numpy()
        np.testing.assert_allclose(block, np.kron(ry, rx), atol=1e-12)
        for i in range(r):  # modes stay independent
            if i != j:
                assert float(cov.view(L, r, L, r)[:, j, :, i].abs().max()) < 1e-12


def test_fit_recovers_the_correlations_and_ignores_invalid_tokens():
    truth = GridCorrelation(torch.tensor([0.7, -0.5]), torch.tensor([0.2, -0.8]), (5, 6))
    g = torch.Generator().manual_seed(0)
    tokens = truth(torch.randn(8000, 30, 2, generator=g, dtype=torch.float64)) + torch.tensor([3.0, -1.0])
    valid = torch.ones(30, dtype=torch.bool)
    valid[[0, 7, 29]] = False
    spoiled = tokens.clone()
    spoiled[:, ~valid] = 1e6  # land patches: whatever they hold must not count
    spoiled[0, 3, 1] = float("nan")
    for data, v in ((tokens, None), (spoiled, valid)):
        fitted = GridCorrelation.fit(data, (5, 6), v)
        np.testing.assert_allclose(fitted.rho_y, truth.rho_y, atol=0.02)
        np.testing.assert_allclose(fitted.rho_x, truth.rho_x, atol=0.02)
    one_row = GridCorrelation.fit(tokens.view(8000, 30, 2)[:, :6], (1, 6))
    assert one_row.rho_y.abs().max() == 0 and one_row.rho_x.abs().min() > 0.1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rho_x must be finite with"):
        GridCorrelation(torch.tensor([0.1]), torch.tensor([0.99]), (2, 2))
    with pytest.raises(ValueError, match="rho_y and rho_x must be"):
        GridCorrelation(torch.tensor([0.1]), torch.tensor([0.1, 0.2]), (2, 2))
    noise = GridCorrelation(torch.tensor([0.1]), torch.tensor([0.2]), (2, 2))
    with pytest.raises(ValueError, match=r"noise must be \[..., L = 4, r = 1\]"):
        noise(torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match=r"tokens must be \[N, L = 2·2, r\]"):
        GridCorrelation.fit(torch.zeros(3, 5, 1), (2, 2))
    assert GridCorrelation.from_state(json.loads(json.dumps(noise.state()))).state() == noise.state()


class ExactDenoiser(nn.Module):
    """v-prediction for tokens x0 ~ N(0, C) under noise N(0, C) with C a correlation matrix:
    E[x0 | x_t] = α/(α² + σ²) x_t element by element, whatever C is."""

    def __init__(self, schedule, rank):
        super().__init__()
        self.schedule, self.config = schedule, SimpleNamespace(rank=rank)

    def forward(self, x, cond, t):
        alpha, sigma = (v.double().reshape(-1, 1, 1) for v in self.schedule.alpha_sigma(t.float()))
        x0 = alpha * x / (alpha**2 + sigma**2)
        return (alpha * x - x0) / sigma


@pytest.mark.parametrize("sampler, steps", [("ddim", 25), ("dpmsolver++", 10), ("sde-dpmsolver++", 60),
                                            ("ancestral", 60)])
def test_samplers_driven_by_coloured_noise_keep_the_correlation(sampler, steps):
    truth = GridCorrelation(torch.tensor([0.6, -0.5]), torch.tensor([0.7, 0.0]), (4, 5))
    schedule = CosineSchedule()
    scheduler = DiffusionScheduler(schedule, "v", sampler)
    cond = torch.zeros(3000, 20, 2, dtype=torch.float64)
    results = {}
    for name, colour in (("white", lambda e: e), ("coloured", truth)):
        white = RowNoise(range(3000))  # one stream per chain, advanced by every draw
        def noise(shape, dtype, c=colour, w=white):
            return c(w(shape, dtype))
        with torch.no_grad():
            x = scheduler.sample(ExactDenoiser(schedule, 2), cond, steps,
                                 noise=(lambda shape, dtype, n=noise: n(shape, torch.float64)))
        results[name] = GridCorrelation.fit(x, (4, 5))
        assert abs(float(x.std()) - 1.0) < 0.05, (name, float(x.std()))
    np.testing.assert_allclose(results["coloured"].rho_y, truth.rho_y, atol=0.05)
    np.testing.assert_allclose(results["coloured"].rho_x, truth.rho_x, atol=0.05)
    assert float(results["white"].rho_y.abs().max()) < 0.05  # the test can fail: white noise loses it


def smooth_fields(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.randn(n, 1, 16, 16, generator=g).cumsum(-1).cumsum(-2) / 16
    return torch.nn.functional.avg_pool2d(hr, 4), hr


def tiny(**overrides):
    return PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=4, rank=6, train_steps=3, batch_size=4,
                          denoiser=dict(width=32, depth=1, heads=2), **overrides)


def test_pipeline_measures_the_correlation_and_keeps_it(tmp_path):
    lr, hr = smooth_fields(24)
    pipe = PODiffPipeline(tiny())
    fit(pipe, lr[:20], hr[:20], progress=False)
    state = pipe.noise_correlation
    assert state is not None and state["grid"] == [4, 4]
    expected = GridCorrelation.fit(pipe.target_tokens(hr[:20]), (4, 4))
    np.testing.assert_allclose(state["rho_x"], expected.rho_x.tolist(), atol=1e-12)
    assert max(abs(v) for v in state["rho_x"]) > 0.3  # integrated noise: neighbours are alike
    # the training noise carries it
    _, eps = training_noise(pipe, torch.zeros(4000, 16, 6, dtype=torch.float64), torch.Generator().manual_seed(1))
    np.testing.assert_allclose(GridCorrelation.fit(eps, (4, 4)).rho_x, state["rho_x"], atol=0.03)
    # saved and loaded: the same ensemble
    before = pipe.sample(lr[20:], num_samples=4, steps=3, seed=0).mean
    pipe.save(tmp_path / "model")
    loaded = PODiffPipeline.load(tmp_path / "model")
    assert loaded.noise_correlation == state
    torch.testing.assert_close(loaded.sample(lr[20:], num_samples=4, steps=3, seed=0).mean, before)
    # a model saved before the option existed: no correlation stored, white noise
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.pop("noise_correlation"), config["config"].pop("correlated_noise")
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    old = PODiffPipeline.load(tmp_path / "model")
    assert old.token_noise is None
    white = old.sample(lr[20:], num_samples=4, steps=3, seed=0).mean
    assert not torch.allclose(white, before)


def test_correlated_noise_off_draws_white_noise():
    lr, hr = smooth_fields(12)
    pipe = PODiffPipeline(tiny(correlated_noise=False))
    fit(pipe, lr, hr, progress=False)
    assert pipe.noise_correlation is None and pipe.token_noise is None


def test_valid_locations_mark_patches_with_a_valid_pixel():
    from podiff.latent.pod import PatchPOD

    x = torch.randn(6, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    x[:, :, :4, :4] = float("nan")   # the top-left patch is all land
    x[:, :, 4, 11] = float("nan")    # one land pixel leaves its patch valid
    pod = PatchPOD(4, rank=3).fit(x)
    assert pod.valid_locations().tolist() == [False, True, True, True, True, True]
