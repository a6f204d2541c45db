"""Sampling a domain other than the training grid (``model.domain``, ``PipelineConfig(domain="any")``):
a model with nothing fitted per location samples fields of any size, its closed-form moments exact
there; anything that binds a model to its grid is named in a one-line error."""

import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.diffusion.denoiser import DenoiserConfig, PODDenoiser
from podiff.fitting import build, fit
from podiff.mean.ridge import RidgeBaseline
from podiff.model.domain import domain_limits, valid_pixels_of

S = 4


def fields(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = F.avg_pool2d(torch.randn(n, 1, h + 4, w + 4, generator=g), 5, stride=1) * 3
    return F.avg_pool2d(hr, S), hr


def config(**kw):
    return PipelineConfig(**{**dict(domain="any", residual="ridge", antithetic=False, scale=S, patch_size=4, rank=12,
                                    crop=3, denoiser=dict(width=16, depth=2, heads=2, window=2), batch_size=4,
                                    sample_steps=3, train_steps=8, learning_rate=3e-3), **kw})


@pytest.fixture(scope="module")
def trained():
    lr, hr = fields(16, 16, 24)
    pipe = PODiffPipeline(config())
    fit(pipe, lr, hr, progress=False)
    return pipe


def test_the_config_of_any_domain_resolves_and_refuses_what_binds_a_grid():
    cfg = PipelineConfig(domain="any")
    assert cfg.denoiser_settings() == {"window": 8, "position_embedding": "none"}
    assert (cfg.resolved_condition, cfg.resolved_basis) == ("detail", "shared")
    assert PipelineConfig(domain="any", denoiser={"window": 4}).denoiser_settings()["window"] == 4
    fixed = PipelineConfig()
    assert (fixed.resolved_condition, fixed.resolved_basis, fixed.denoiser_settings()) == ("anomaly", "auto", {})
    for kw, named in [(dict(basis="local"), "basis='local'"), (dict(condition="anomaly"), "condition='anomaly'"),
                      (dict(denoiser={"window": 0}), "denoiser window=0"),
                      (dict(denoiser={"position_embedding": "sincos"}), "denoiser position_embedding='sincos'"),
                      (dict(denoiser_kind="mlp"), "denoiser_kind='mlp'")]:
        with pytest.raises(ValueError, match="domain='any' samples fields of any size and place, so it cannot have "
                                             + named.replace("(", r"\(")):
            PipelineConfig(domain="any", **kw)
    with pytest.raises(ValueError, match="domain must be one of 'fixed', 'any'; got 'global'"):
        PipelineConfig(domain="global")


def test_a_model_of_any_domain_has_no_grid_position_a_shared_ridge_and_the_detail_condition(trained):
    assert domain_limits(trained) == []
    assert trained.denoiser.config.position_embedding == "none" and trained.denoiser.config.window == 2
    assert not trained.mean_model.ridge.per_location and not trained.pod.local


@pytest.mark.parametrize("shape", [(24, 40), (8, 12)])
def test_a_larger_or_smaller_field_is_sampled_with_exact_closed_form_moments(trained, shape):
    lr, _ = fields(2, *shape, seed=3)
    out = trained.sample(lr, num_samples=5, seed=1, return_samples=True)
    assert out.mean.shape == out.variance.shape == (2, 1, *shape) and out.samples.shape == (5, 2, 1, *shape)
    # The closed form on the domain's own patch grid: the members' mean and (spread-scaled) variance.
    members = out.samples.double()
    torch.testing.assert_close(out.mean.double(), members.mean(0), rtol=0, atol=2e-5)
    torch.testing.assert_close(out.variance.double(), members.var(0), rtol=1e-4, atol=1e-6)
    assert float(out.variance.mean()) > 0
    # The ensemble is the residual's around μ(lr), the ridge's prediction of these inputs.
    mu = trained.mean_model.predict(lr)
    assert float((out.mean - mu).abs().mean()) < float(mu.abs().mean())


def test_the_view_of_its_own_grid_is_the_model_and_samples_what_the_model_samples(trained):
    assert trained.for_domain(trained.image_size) is trained
    lr, _ = fields(2, 16, 24, seed=4)
    view = trained.for_domain(trained.image_size, torch.ones(1, 16, 24, dtype=torch.bool))
    assert view is not trained and view.pod.grid == trained.pod.grid
    a, b = trained.sample(lr, num_samples=3, seed=2), view.sample(lr, num_samples=3, seed=2)
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.variance, b.variance, rtol=0, atol=0)


def test_cells_without_data_are_nan_on_another_domain(trained):
    lr, _ = fields(2, 24, 32, seed=5)
    lr[:, :, 1:3, 2:4] = float("nan")  # no data in either field: land, outside the domain's valid pixels
    lr[0, :, 5, 5] = float("nan")  # a gap in one field: the ridge predicts nothing there, as on the training grid
    out = trained.sample(lr, num_samples=3, seed=0)
    land = torch.zeros(2, 24, 32, dtype=torch.bool)
    land[:, 4:12, 8:16] = True
    assert torch.equal(valid_pixels_of(lr, 1, S)[0], ~land[0])
    assert torch.equal(torch.isnan(out.variance[:, 0]), land)  # the residual's variance: valid pixels
    land[0, 20:24, 20:24] = True
    assert torch.equal(torch.isnan(out.mean[:, 0]), land)


def test_a_saved_model_of_any_domain_samples_another_domain_as_before(trained, tmp_path):
    trained.save(tmp_path / "m")
    loaded = PODiffPipeline.load(tmp_path / "m")
    assert loaded.config.domain == "any" and loaded.denoiser.config.position_embedding == "none"
    lr, _ = fields(1, 20, 28, seed=6)
    a, b = trained.sample(lr, num_samples=3, seed=0), loaded.sample(lr, num_samples=3, seed=0)
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.variance, b.variance, rtol=0, atol=0)


def test_what_binds_a_model_to_its_grid_is_named_in_one_line():
    lr, hr = fields(10, 16, 16)
    fixed = build(PODiffPipeline(config(domain="fixed", condition="anomaly", crop=0,
                                        denoiser=dict(width=16, depth=1, heads=2))), lr, hr)
    limits = domain_limits(fixed)
    assert [any(k in line for line in limits) for k in ("sincos position embedding of the 16×16 training grid",
                                                        "global attention", "training mean per pixel")] == [True] * 3
    with pytest.raises(ValueError) as err:
        fixed.sample(fields(1, 24, 24)[0], num_samples=2)
    message = str(err.value)
    assert "not the trained (4, 4)" in message and "samples only 16×16 fields, not 24×24" in message
    assert "--domain any" in message and "\n" not in message
    local = build(PODiffPipeline(config(domain="fixed", basis="local", residual="none", rank=4)), lr, hr)
    assert any("local POD basis" in line for line in domain_limits(local))
    anywhere = build(PODiffPipeline(config()), lr, hr)
    assert domain_limits(anywhere) == []
    anywhere.mean_model.ridge = RidgeBaseline(S, per_location=True).fit(lr.double(), hr.double())
    assert domain_limits(anywhere) == ["the ridge's per-location weights on the 16×16 training grid"]
    with pytest.raises(ValueError, match="image_size must be \\(H, W\\), each a multiple of the scale 4"):
        anywhere.for_domain((18, 20))


def test_without_a_position_embedding_the_denoiser_does_not_depend_on_the_origin():
    torch.manual_seed(0)
    net = PODDenoiser(DenoiserConfig(rank=4, grid=(4, 6), width=16, depth=2, heads=2, window=2,
                                     position_embedding="none"))
    torch.nn.init.normal_(net.head.weight, std=0.2)
    for block in net.blocks:
        torch.nn.init.normal_(block.ada[-1].weight, std=0.2)
    x, c, t = torch.randn(2, 24, 4), torch.randn(2, 24, 4), torch.rand(2)
    torch.testing.assert_close(net(x, c, t), net(x, c, t, grid=(4, 6), origin=(0.5, 3.0)), rtol=0, atol=0)
    with_position = PODDenoiser(DenoiserConfig(rank=4, grid=(4, 6), width=16, depth=2, heads=2, window=2))
    with_position.load_state_dict(net.state_dict())
    assert not torch.allclose(with_position(x, c, t), with_position(x, c, t, origin=(0.5, 3.0)))
    with pytest.raises(ValueError, match="position_embedding must be one of 'sincos', 'none'; got 'learned'"):
        DenoiserConfig(rank=4, grid=(2, 2), position_embedding="learned")
