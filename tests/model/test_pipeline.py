"""PODiffPipeline end to end: a Gaussian problem with a known posterior, analytic = decoded
ensemble variance, seeds, save/load, checkpoint/resume, masks, the learned schedule, errors."""

import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.data.resample import upsample
from podiff.fitting import fit, loss

H, S = 16, 4


def gaussian_fields(n, seed):
    """x = K w: a 7×7 box blur of white noise (so the covariance is known exactly)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 1, H + 6, H + 6, generator=g, dtype=torch.float64)
    return F.avg_pool2d(w, 7, stride=1) * 7


def posterior(lr):
    """Exact posterior mean [N, 1, H, H] and per-pixel variance [H, H] of x given LR = A x."""
    Dw = (H + 6) ** 2
    K = (F.avg_pool2d(torch.eye(Dw, dtype=torch.float64).reshape(Dw, 1, H + 6, H + 6), 7, stride=1) * 7)
    K = K.reshape(Dw, H * H).T
    sigma = K @ K.T
    A = F.avg_pool2d(torch.eye(H * H, dtype=torch.float64).reshape(-1, 1, H, H), S).reshape(H * H, -1).T
    gain = sigma @ A.T @ torch.linalg.inv(A @ sigma @ A.T)
    mean = (gain @ lr.reshape(lr.shape[0], -1).T).T.reshape(-1, 1, H, H)
    var = (sigma - gain @ A @ sigma).diagonal().reshape(H, H)
    return mean, var


def small_config(**kw):
    base = dict(residual="none", antithetic=False, scale=S, patch_size=4, rank=16, train_steps=400, batch_size=128,
                learning_rate=2e-3, warmup=50,
                denoiser=dict(width=64, depth=3, heads=4), sample_steps=20, ema_decay=0.99)
    return PipelineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained():
    hr = gaussian_fields(3000, 0).float()
    pipe = PODiffPipeline(small_config())
    fit(pipe, F.avg_pool2d(hr, S), hr, progress=False)
    return pipe


def test_gaussian_posterior_is_learned(trained):
    """Mean closer to the truth than bicubic; predicted variance within a factor 1.5 of the true
    posterior variance (measured at 400 steps: RMSE 0.472 vs bicubic 0.496, optimum 0.462;
    variance ratio 0.84)."""
    hr = gaussian_fields(60, 1)
    lr = F.avg_pool2d(hr, S)
    post_mean, post_var = posterior(lr)
    out = trained.sample(lr.float(), num_samples=32, seed=0)
    rmse = lambda a, b: float((a.double() - b).pow(2).mean().sqrt())  # noqa: E731
    model, bic = rmse(out.mean, hr), rmse(upsample(lr, (H, H)), hr)
    optimum = rmse(post_mean, hr)
    assert model < bic, (model, bic)
    assert optimum <= model + 1e-3  # sanity: nothing beats the exact posterior mean
    ratio = float(out.variance.double().mean() / post_var.mean())
    assert 1 / 1.5 < ratio < 1.5, ratio


def test_analytic_variance_equals_decoded_ensemble_without_overlap(trained):
    lr = F.avg_pool2d(gaussian_fields(3, 2), S).float()
    out = trained.sample(lr, num_samples=12, steps=5, seed=1, return_samples=True)
    assert out.samples.shape == (12, 3, 1, H, H)
    torch.testing.assert_close(out.mean, out.samples.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.variance, out.samples.var(0), rtol=1e-3, atol=1e-5)
    diag = trained.sample(lr, num_samples=12, steps=5, seed=1, variance="diagonal")
    assert torch.equal(diag.mean, out.mean) and not torch.allclose(diag.variance, out.variance)


def test_seeded_sampling_repeats(trained):
    lr = F.avg_pool2d(gaussian_fields(2, 3), S).float()
    a = trained.sample(lr, num_samples=4, steps=4, seed=7)
    b = trained.sample(lr, num_samples=4, steps=4, seed=7)
    c = trained.sample(lr, num_samples=4, steps=4, seed=8)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    assert not torch.equal(a.mean, c.mean)


def test_save_load_round_trip_is_bit_exact(trained, tmp_path):
    trained.save(tmp_path / "model")
    back = PODiffPipeline.load(tmp_path / "model")
    lr = F.avg_pool2d(gaussian_fields(2, 4), S).float()
    a = trained.sample(lr, num_samples=3, steps=3, seed=0)
    b = back.sample(lr, num_samples=3, steps=3, seed=0)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="weights.safetensors is unreadable"):
        PODiffPipeline.load(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        PODiffPipeline.load(tmp_path / "nothing")


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    hr = gaussian_fields(200, 5).float()
    lr = F.avg_pool2d(hr, S)
    cfg = small_config(train_steps=12, batch_size=16, denoiser=dict(width=32, depth=1, heads=2))
    straight = PODiffPipeline(cfg)
    fit(straight, lr, hr, progress=False)
    ckpt = tmp_path / "run.ckpt"
    first = PODiffPipeline(cfg)
    fit(first, lr, hr, steps=7, checkpoint=ckpt, checkpoint_every=5, progress=False)
    resumed = PODiffPipeline(cfg)  # a new process would start here
    fit(resumed, lr, hr, checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert resumed.training.history == straight.training.history
    for (name, a), b in zip(straight.denoiser.state_dict().items(), resumed.denoiser.state_dict().values(),
                            strict=False):
        assert torch.equal(a, b), name
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot resume from"):
        fit(PODiffPipeline(cfg), lr, hr, checkpoint=ckpt, progress=False)


def test_masked_pixels_come_back_nan():
    hr = gaussian_fields(120, 6).float()
    hr[:, :, :4, :8] = float("nan")  # "land": a fixed region
    lr = F.avg_pool2d(hr, S)  # NaN propagates to the LR land cells
    pipe = PODiffPipeline(small_config(train_steps=5, basis="local", denoiser=dict(width=32, depth=1, heads=2)))
    fit(pipe, lr, hr, progress=False)
    out = pipe.sample(lr[:2], num_samples=3, steps=2)
    land = torch.zeros(H, H, dtype=torch.bool)
    land[:4, :8] = True
    assert torch.isnan(out.mean[..., land]).all() and torch.isnan(out.variance[..., land]).all()
    assert torch.isfinite(out.mean[..., ~land]).all() and (out.variance[..., ~land] >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_learned_schedule_trains(prediction):
    hr = gaussian_fields(400, 7).float()
    lr = F.avg_pool2d(hr, 2)  # ×2: an informative condition, so there is much to learn
    pipe = PODiffPipeline(small_config(scale=2, schedule="learned", prediction_type=prediction, train_steps=200,
                                       batch_size=64, denoiser=dict(width=32, depth=2, heads=2)))
    fit(pipe, lr, hr, steps=0, progress=False)  # builds POD, denoiser and schedule
    x0, cond = pipe.target_tokens(hr).float(), pipe.condition_tokens(lr).float()

    def held_loss():  # the same noise and times before and after: a low-variance comparison
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(loss(pipe, x0, cond, g)) for _ in range(10)) / 10

    before = held_loss()
    fit(pipe, lr, hr, progress=False)
    after = held_loss()
    assert after < 0.9 * before, (before, after)  # measured: 0.498 -> 0.415 (v) in 200 steps
    assert pipe.denoiser.config.noise_input == "per_token"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.schedule.parameters())
    out = pipe.sample(lr[:2], num_samples=3, steps=4)
    assert torch.isfinite(out.mean).all()


def test_errors():
    hr = gaussian_fields(8, 8).float()
    lr = F.avg_pool2d(hr, S)
    pipe = PODiffPipeline(small_config(train_steps=1, denoiser=dict(width=32, depth=1, heads=2)))
    with pytest.raises(RuntimeError, match="not trained"):
        pipe.sample(lr)
    with pytest.raises(ValueError, match="same number of samples; got 7 and 8"):
        fit(pipe, lr[:7], hr, progress=False)
    with pytest.raises(ValueError, match=r"hr must be scale=4 times lr's size \(4, 4\) = \(16, 16\); got \(12, 12\)"):
        fit(pipe, lr, hr[..., :12, :12], progress=False)
    fit(pipe, lr, hr, progress=False)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        pipe.sample(lr, num_samples=1)
    with pytest.raises(ValueError, match=r"lr must be \[B, 1, 4, 4\] \(the trained size\)"):
        pipe.sample(lr.expand(-1, 2, -1, -1))
    with pytest.raises(ValueError, match=r"lr is \(3, 3\) cells, not the trained \(4, 4\), and this model samples "
                                         r"only 16×16 fields, not 12×12: it holds .*global attention"):
        pipe.sample(lr[..., :3, :3])
    with pytest.raises(ValueError, match="variance must be 'block' or 'diagonal'"):
        pipe.sample(lr, variance="full")
