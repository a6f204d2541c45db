"""The mean model's choice (``mean.mean_model``): the U-Net only where it is better on the
validation fields, saved and refitted as the ridge is, and a residual pipeline over it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.evaluation import metrics
from podiff.fitting import fit
from podiff.mean.mean_model import LEVEL, UNET_FILE, MeanModel
from podiff.mean.unet import UNetBaseline

UNET = dict(steps=200, eval_every=25, patience=4, seed=3, unet=dict(width=8, learning_rate=3e-3))


def smooth(n, size=16, seed=0, k=7, square=0.0):
    """Smooth fields; ``square`` adds a nonlinearity no linear map of the block means has."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 2 * (k - 1), size + 2 * (k - 1), generator=g)
    hr = F.avg_pool2d(F.avg_pool2d(x, k, stride=1), k, stride=1) * k
    hr = hr + square * hr**2
    return F.avg_pool2d(hr, 4), hr


@pytest.mark.parametrize("unet_error, expected", [("small", "unet"), ("large", "ridge"), ("mixed", "ridge")])
def test_auto_takes_the_unet_only_where_the_validation_fields_show_it_better(monkeypatch, unet_error, expected):
    """The rule, with a U-Net whose error on each validation field is set: the truth plus noise of
    a given RMS (``"mixed"``: far below the ridge's on half the fields, above it on the others: a
    lower RMSE over the four, which the paired t-test does not take for a better model)."""
    lr, hr = smooth(44, square=0.6)
    fitted = MeanModel.fit(4, lr[:40], hr[:40], (lr[40:], hr[40:]), residual="ridge")
    ridge_rmse = metrics.rmse(fitted.ridge.predict(lr[40:].double()), hr[40:].double())
    factors = {"small": [0.1] * 4, "large": [3.0] * 4, "mixed": [0.1, 0.1, 1.35, 1.35]}[unet_error]

    def predict(self, lr_in):  # the truth of the fields asked for, off by the set RMS each
        rows = [int(torch.nonzero((lr.float() == f).flatten(1).all(1))[0]) for f in lr_in.float()]
        noise = torch.randn(len(rows), *hr.shape[1:], generator=torch.Generator().manual_seed(0))
        noise = noise / noise.square().flatten(1).mean(1).sqrt().view(-1, 1, 1, 1)
        return hr[rows] + ridge_rmse * torch.tensor([factors[r - 40] for r in rows]).view(-1, 1, 1, 1) * noise

    monkeypatch.setattr(UNetBaseline, "predict", predict)
    model = MeanModel.fit(4, lr[:40], hr[:40], (lr[40:], hr[40:]), residual="auto", **dict(UNET, steps=2))
    choice = model.choice
    assert choice["regressor"] == model.regressor == expected
    assert choice["ridge_val_rmse"] == pytest.approx(ridge_rmse)
    if unet_error == "mixed":
        assert choice["unet_val_rmse"] < ridge_rmse and choice["unet_better_p"] > LEVEL, choice
    if unet_error == "small":
        assert choice["unet_better_p"] < LEVEL, choice
    assert model.unet_candidate[0] is not None  # fitted either way: the U-Net baseline reuses it
    expected_mu = predict(None, lr[40:]) if expected == "unet" else model.ridge.predict(lr[40:].double()).float()
    torch.testing.assert_close(model.predict(lr[40:]), expected_mu)
    # without validation fields auto is the ridge, and no U-Net is trained
    plain = MeanModel.fit(4, lr[:40], hr[:40], residual="auto", **UNET)
    assert plain.regressor == "ridge" and plain.unet_candidate is None


def test_a_unet_mean_saves_loads_and_refits_by_continuing(tmp_path):
    lr, hr = smooth(60, square=0.6)
    model = MeanModel.fit(4, lr[:40], hr[:40], (lr[40:50], hr[40:50]), residual="unet", **UNET)
    assert model.regressor == "unet"
    model.cond_mean, model.cond_scale = torch.zeros(1, 16, 16), torch.ones(4)
    model.save(tmp_path / "mean_model.safetensors")
    assert (tmp_path / UNET_FILE).is_file()
    back = MeanModel.load(tmp_path / "mean_model.safetensors")
    torch.testing.assert_close(back.predict(lr[50:]), model.predict(lr[50:]))
    assert back.choice == model.choice and "out_of_fold" not in back.choice
    torch.testing.assert_close(model.out_of_fold(lr[:40], hr[:40]), model.predict(lr[:40]))  # in sample
    held = copy.deepcopy(model.unet.model.state_dict())
    refitted = model.refitted(lr[:50], hr[:50], held_out=10)
    chosen = model.unet.best_step
    assert refitted.choice["unet_refit"]["steps"] == -(-chosen * 10 // 40)  # the chosen steps per field
    assert refitted.unet.steps == model.unet.steps + refitted.choice["unet_refit"]["steps"]
    for name, tensor in model.unet.model.state_dict().items():  # the held-out fit is left as it was
        assert torch.equal(tensor, held[name])
    assert refitted.choice["refitted_fields"] == 50 and refitted.ridge.settings() == model.ridge.settings()
    with pytest.raises(ValueError, match="residual must be one of"):
        MeanModel.fit(4, lr, hr, residual="none")


def test_a_pipeline_over_a_unet_mean_trains_samples_and_reloads(tmp_path):
    lr, hr = smooth(60, square=0.6)
    config = PipelineConfig(residual="unet", antithetic=False, rank=6, denoiser=dict(width=32, depth=1, heads=2),
                            batch_size=8, sample_steps=4, train_steps=30)
    pipe = PODiffPipeline(config)
    fit(pipe, lr[:40], hr[:40], validation=(lr[40:50], hr[40:50]), eval_every=10, progress=False)
    assert pipe.mean_model.regressor == "unet" and "U-Net" in pipe.describe()
    out = pipe.sample(lr[50:], num_samples=4, seed=0)
    pipe.save(tmp_path / "model")
    back = PODiffPipeline.load(tmp_path / "model").sample(lr[50:], num_samples=4, seed=0)
    torch.testing.assert_close(back.mean, out.mean)
    torch.testing.assert_close(back.variance, out.variance)
    # the ensemble mean is the U-Net's μ plus the residual's mean: near the U-Net, far from bicubic
    mu = pipe.mean_model.predict(lr[50:])
    assert metrics.rmse(out.mean, hr[50:]) < 1.5 * metrics.rmse(mu, hr[50:])
