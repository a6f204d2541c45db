"""A deterministic baseline as a calibrated probabilistic forecast (``baselines.calibrated.ErrorSpread``)
and the report's comparison of the diffusion with the best of them."""

import numpy as np
import properscoring
import pytest
import torch

from podiff.baselines import ErrorSpread
from podiff.evaluation.report import compare_calibrated, evaluate


def held_out(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, 2, 6, 8, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.2, 2.0, 6 * 8, dtype=torch.float64).view(1, 1, 6, 8)  # heteroscedastic errors
    prediction = truth + scale * torch.randn(n, 2, 6, 8, generator=g, dtype=torch.float64)
    truth[:, 0, 0, :2] = float("nan")  # masked pixels
    truth[:3, 1, 2, 3] = float("nan")  # valid in some fields only
    return prediction, truth


def test_the_spread_is_each_pixels_rms_held_out_error():
    prediction, truth = held_out()
    spread = ErrorSpread.fit(prediction, truth, bands=1)
    err = (truth - prediction).numpy()
    expected = np.sqrt(np.nanmean(err**2, axis=0))  # numpy: NaN where no field is valid
    np.testing.assert_allclose(spread.std.numpy(), expected, rtol=1e-12, equal_nan=True)
    assert spread.fields == 12 and spread.band_edges is None and len(spread.error_quantiles) >= 2
    assert spread.variance(prediction).shape == prediction.shape


def test_a_calibrated_baseline_is_scored_as_a_gaussian_forecast_against_properscoring():
    prediction, truth = held_out(seed=1)
    spread = ErrorSpread(ErrorSpread.fit(prediction, truth, 1).std, fields=12)  # no error shape: Gaussian
    test_pred, test_truth = held_out(n=6, seed=2)
    mean = test_truth.nan_to_num(0.0) + 0.01  # the model: close to the truth
    result = evaluate(mean, torch.full_like(mean, 1e-4), test_truth, torch.zeros(6, 2, 3, 4), scale=2,
                      predictions={"ridge": test_pred.clone()}, spreads={"ridge": spread})
    sd = spread.std.expand_as(test_pred).numpy()
    valid = ~np.isnan(test_truth.numpy()) & ~np.isnan(sd)
    expected = properscoring.crps_gaussian(test_truth.numpy()[valid], test_pred.numpy()[valid], sd[valid]).mean()
    assert result["ridge"]["crps"] == pytest.approx(expected, rel=1e-9)
    assert result["ridge"]["calibrated_on_fields"] == 12 and "mace" in result["ridge"]
    comparison = result["comparison"]
    assert comparison["best_calibrated"] == "ridge" and comparison["crps_ratio"] < 1
    assert comparison["sentence"].startswith("The diffusion beats the best calibrated regression (ridge")


def test_the_comparison_takes_the_best_peer_and_the_members_crps():
    result = {"model": {"rmse": 1.0, "crps": 0.5, "crps_ensemble_fair": 0.6},
              "ridge": {"rmse": 0.9, "crps": 0.55, "crps_gaussian": 0.52},
              "bicubic": {"rmse": 2.0, "crps": 1.0}, "regression": {"rmse": 0.95}, "meta": {}}
    c = compare_calibrated(result)
    assert c["best_calibrated"] == "ridge" and c["best_calibrated_crps"] == 0.52 and c["crps"] == 0.6
    assert c["crps_ratio"] == pytest.approx(0.6 / 0.52) and c["best_rmse_baseline"] == "ridge"
    assert "does not beat" in c["sentence"] and "15.4 % above" in c["sentence"]
    assert compare_calibrated({"model": {"rmse": 1.0, "crps": 0.5}, "ridge": {"rmse": 0.9}, "meta": {}}) is None


def test_save_load_and_bad_input(tmp_path):
    prediction, truth = held_out()
    spread = ErrorSpread.fit(prediction, truth, bands=3)
    spread.save(tmp_path / "s.safetensors")
    back = ErrorSpread.load(tmp_path / "s.safetensors")
    assert torch.equal(back.std.nan_to_num(-1), spread.std.nan_to_num(-1))
    assert back.error_quantiles == spread.error_quantiles and back.band_edges == spread.band_edges
    with pytest.raises(ValueError, match=r"prediction and truth must both be \[N, C, H, W\]"):
        ErrorSpread.fit(prediction, truth[:, :1])
    with pytest.raises(ValueError, match="at least 2 held-out fields; got 1"):
        ErrorSpread.fit(prediction[:1], truth[:1])
    with pytest.raises(ValueError, match=r"fitted on \(2, 6, 8\)"):
        spread.variance(torch.zeros(1, 2, 6, 6))
