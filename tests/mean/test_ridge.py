"""The tuned ridge (``podiff.mean.ridge.RidgeBaseline``): scikit-learn's ridge at every placement,
the choice on validation fields, save and load."""

import pytest
import torch
import torch.nn.functional as F
from utils import smooth

from podiff import baselines

S = 4


def _design(lr, k):
    """The features a practitioner builds by hand: nearest-valid fill, replicate pad, k×k windows."""
    from podiff.mean.ridge import fill_nearest

    padded = F.pad(fill_nearest(lr), (k // 2,) * 4, mode="replicate")
    return F.unfold(padded, k).transpose(1, 2).reshape(-1, lr.shape[1] * k * k)


def test_ridge_beats_bicubic_and_equals_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    hr_train, hr_test = smooth(300, 0), smooth(40, 1)
    lr_train, lr_test = F.avg_pool2d(hr_train, S), F.avg_pool2d(hr_test, S)
    ridge = baselines.RidgeBaseline(S, neighbourhood=5, alpha=1e-4).fit(lr_train, hr_train)
    err = lambda a: float((a - hr_test).pow(2).mean().sqrt())  # noqa: E731
    ridge_err, bicubic_err = err(ridge.predict(lr_test)), err(baselines.bicubic(lr_test, S))
    assert ridge_err < 0.85 * bicubic_err, (ridge_err, bicubic_err)  # measured 0.184 vs 0.226
    # scikit-learn on the hand-built design with the same absolute penalty (intercept unpenalised).
    X = _design(lr_train, 5).double().numpy()
    Y = F.unfold(hr_train.double(), S, stride=S).transpose(1, 2).reshape(-1, S * S).numpy()
    ref = linear_model.Ridge(alpha=ridge.penalty).fit(X, Y)
    got = ridge.predict(lr_test.double())
    want = ref.predict(_design(lr_test, 5).double().numpy())
    want = F.fold(torch.from_numpy(want).reshape(40, -1, S * S).transpose(1, 2), (32, 32), S, stride=S)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    out = ridge.sample(lr_test[:2], num_samples=3, return_samples=True)
    assert out.samples.shape == (3, 2, 1, 32, 32) and (out.variance == 0).all()


def test_per_location_ridge_equals_scikit_learn_at_each_location_with_masked_targets():
    """Per-location weights on a masked field: each output pixel is fitted on the fields where it
    is valid, as sklearn fits it on those rows."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    hr = smooth(30, 3, size=16).double()
    lr = F.avg_pool2d(hr, S)
    hr[::3, 0, 5, 6] = float("nan")  # one HR pixel missing in a third of the fields
    hr[:, 0, :4, :4] = float("nan")  # a block of land: the LR pixel is NaN, filled from its neighbours
    lr[:, 0, 0, 0] = float("nan")
    ridge = baselines.RidgeBaseline(S, neighbourhood=3, alpha=1e-2, per_location=True).fit(lr, hr)
    X = _design(lr, 3).double().reshape(30, 16, 9)
    Xc = X - X.reshape(-1, 9).mean(0)
    Y = F.unfold(torch.nan_to_num(hr, nan=0.0), S, stride=S).transpose(1, 2)  # 30, 16, 16
    V = F.unfold((~torch.isnan(hr)).double(), S, stride=S).transpose(1, 2) > 0
    location, output = 5, 1 * S + 1  # LR pixel (1, 1): HR pixel (5, 5), then the sparse one (5, 6)
    for out_pixel in (output, output + 1):
        rows = V[:, location, out_pixel]
        ref = linear_model.Ridge(alpha=ridge.penalty).fit(Xc[rows, location].numpy(),
                                                          Y[rows, location, out_pixel].numpy())
        w = ridge.weights[location, out_pixel]
        torch.testing.assert_close(w[:-1], torch.from_numpy(ref.coef_), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(w[-1], torch.tensor(ref.intercept_, dtype=torch.float64), rtol=1e-7, atol=1e-9)
    assert int(V[:, location, output + 1].sum()) == 20
    assert torch.isnan(ridge.predict(lr)[:, 0, :4, :4]).all()


def test_pooled_ridge_is_scikit_learn_ridge_on_what_the_shared_fit_leaves():
    """Pooled per-location weights: ``W_l = W_s + D_l`` with ``D_l`` the ridge (no intercept, the
    intercept column penalised too) of the shared fit's residual on that location's valid rows."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    hr = smooth(30, 5, size=16).double()
    lr = F.avg_pool2d(hr, S)
    hr[::4, 0, 9, 2] = float("nan")
    ridge = baselines.RidgeBaseline(S, neighbourhood=3, alpha=1e-3, per_location=True, pooling=0.05).fit(lr, hr)
    shared = baselines.RidgeBaseline(S, neighbourhood=3, alpha=1e-3).fit(lr, hr)
    X = _design(lr, 3).double().reshape(30, 16, 9)
    Xa = torch.cat([X - X.reshape(-1, 9).mean(0), torch.ones(30, 16, 1, dtype=torch.float64)], -1)
    Y = F.unfold(torch.nan_to_num(hr, nan=0.0), S, stride=S).transpose(1, 2)
    V = F.unfold((~torch.isnan(hr)).double(), S, stride=S).transpose(1, 2) > 0
    location, sparse = 2 * 4 + 0, 1 * S + 2  # LR pixel (2, 0) holds HR pixel (9, 2) at output (1, 2)
    for out_pixel in (0, sparse):
        rows = V[:, location, out_pixel]
        prior = shared.weights[0, out_pixel]
        target = Y[rows, location, out_pixel] - Xa[rows, location] @ prior
        ref = linear_model.Ridge(alpha=ridge.penalty, fit_intercept=False)
        ref = ref.fit(Xa[rows, location].numpy(), target.numpy())
        torch.testing.assert_close(ridge.weights[location, out_pixel], prior + torch.from_numpy(ref.coef_),
                                   rtol=1e-7, atol=1e-9)
    assert int(V[:, location, sparse].sum()) == 22
    # A huge pooling penalty leaves no room for a location of its own: the shared fit.
    far = baselines.RidgeBaseline(S, 3, 1e-3, True, pooling=1e9).fit(lr, hr)
    torch.testing.assert_close(far.predict(lr), shared.predict(lr), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pooling=0.1 pools per-location weights: it needs per_location=True"):
        baselines.RidgeBaseline(S, pooling=0.1)
    with pytest.raises(ValueError, match="pooling must be >= 0; got -1"):
        baselines.RidgeBaseline(S, per_location=True, pooling=-1)


def test_tuned_ridge_chooses_on_validation_and_reports_every_candidate(tmp_path):
    hr = smooth(60, 4, size=16)
    lr = F.avg_pool2d(hr, S)
    best, table = baselines.RidgeBaseline.tuned(S, lr[:40], hr[:40], lr[40:], hr[40:], penalties=(1e-6, 1e-2, 1e2),
                                                poolings=(1e-3, 1e-1))
    assert len(table) == 3 * (2 * 3 + 2)
    (winner,) = [row for row in table if row["chosen"]]
    assert (best.k, best.per_location, best.alpha, best.pooling) == (
        winner["neighbourhood"], winner["per_location"], winner["alpha"], winner["pooling"])
    lowest = min(table, key=lambda row: row["val_rmse"])
    if winner is not lowest:  # only the significance guard may pass over the lowest: for the best shared fit
        assert lowest["per_location"] and not winner["per_location"]
        assert winner is min((r for r in table if not r["per_location"]), key=lambda r: r["val_rmse"])
    refit = baselines.RidgeBaseline(**best.settings()).fit(lr[:40], hr[:40])
    torch.testing.assert_close(best.predict(lr[40:]), refit.predict(lr[40:]))
    # Each pooled row shrinks toward the shared fit that validated best for its k.
    for k in (3, 5, 7):
        shared = min((r for r in table if r["neighbourhood"] == k and not r["per_location"]),
                     key=lambda r: r["val_rmse"])
        assert {r["alpha"] for r in table if r["neighbourhood"] == k and r["pooling"] > 0} == {shared["alpha"]}
    # The chosen model (whatever its placement) survives a save and load; a file from before pooling loads too.
    pooled = baselines.RidgeBaseline(S, 5, 1e-2, True, pooling=1e-1).fit(lr[:40], hr[:40])
    for model in (best, pooled):
        model.save(tmp_path / "r.safetensors")
        loaded, _ = baselines.RidgeBaseline.load(tmp_path / "r.safetensors")
        assert loaded.settings() == model.settings()
        torch.testing.assert_close(loaded.predict(lr[40:]), model.predict(lr[40:]))
    state = {key: value for key, value in pooled.state().items() if key != "pooling"}
    assert baselines.RidgeBaseline.from_state(state, pooled.tensors()).pooling == 0.0
    with pytest.raises(ValueError, match="neighbourhood must be a positive odd int; got 4"):
        baselines.RidgeBaseline(S, neighbourhood=4)
    with pytest.raises(ValueError, match="'pooled' shrinks toward the tuned shared fit, so it needs 'shared' too"):
        baselines.RidgeBaseline.tuned(S, lr[:40], hr[:40], lr[40:], hr[40:], placements=("pooled",))
    with pytest.raises(ValueError, match="placements must be some of"):
        baselines.RidgeBaseline.tuned(S, lr[:40], hr[:40], lr[40:], hr[40:], placements=("global",))


def test_tuned_ridge_goes_per_location_only_when_validation_shows_it():
    """The flexible placements win where the map from coarse to fine depends on the location, and
    are passed over where a stationary field's validation favours them by chance."""
    hr = smooth(200, 6, size=16)
    lr = F.avg_pool2d(hr, S)
    # Stationary fields, 8 validation fields: measured, the lowest validation RMSE is a
    # per-location or pooled fit by chance; on 150 test fields the shared fit is better.
    best, table = baselines.RidgeBaseline.tuned(S, lr[:24], hr[:24], lr[24:32], hr[24:32])
    lowest = min(table, key=lambda row: row["val_rmse"])
    assert lowest["per_location"] and not best.per_location
    flexible = baselines.RidgeBaseline(S, lowest["neighbourhood"], lowest["alpha"], True,
                                       lowest["pooling"]).fit(lr[:24], hr[:24])
    err = lambda m: float((m.predict(lr[50:]) - hr[50:]).pow(2).mean())  # noqa: E731
    assert err(best) < err(flexible)
    # A fine-scale pattern fixed to each location (a coast, a ridge line) that no shared map can know.
    pattern = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    hr_fixed = hr + pattern * (1 + F.interpolate(F.avg_pool2d(hr, S), scale_factor=S))
    lr_fixed = F.avg_pool2d(hr_fixed, S)
    best, _ = baselines.RidgeBaseline.tuned(S, lr_fixed[:24], hr_fixed[:24], lr_fixed[24:32], hr_fixed[24:32])
    assert best.per_location
