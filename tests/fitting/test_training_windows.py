"""Training windows (``latent.windows``): shifted patch grids (``PipelineConfig.grid_shifts``: every
pixel offset within a patch, reaching past the field's edge, NaN there) and crops
(``PipelineConfig.crop``), one per batch; the denoiser places the window's tokens by their
origin; sampling keeps the fitted grid (or several, ``member_grids``: test_member_grids.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from utils import smooth_pairs

from podiff import PipelineConfig, PODiffPipeline
from podiff.data.resample import upsample
from podiff.diffusion.denoiser import DenoiserConfig, PODDenoiser, sincos_2d
from podiff.diffusion.token_noise import GridCorrelation
from podiff.diffusion.training import Trainer, draw_noise
from podiff.fitting import build, fit
from podiff.fitting.fit import FieldTokens
from podiff.latent.windows import TrainingWindows, crop_field

N, H, W, S = 20, 16, 24, 4


def fields(n=N, seed=0, land=False):
    return smooth_pairs(n, (H, W), S, seed, land)


def config(**kw):
    return PipelineConfig(**{**dict(residual="none", antithetic=False, scale=S, patch_size=4, rank=16, basis="shared",
                                    grid_shifts=True, denoiser=dict(width=16, depth=2, heads=2), batch_size=4,
                                    sample_steps=3, train_steps=12, learning_rate=3e-3), **kw})


def built(lr, hr, **kw):
    pipe = PODiffPipeline(config(**kw))
    return build(pipe, lr, hr)


def test_the_position_of_a_shifted_grid_is_the_fitted_grids_at_its_origin():
    full = sincos_2d(32, (5, 7)).view(5, 7, 32)
    whole_patch = sincos_2d(32, (4, 5), origin=(1.0, 2.0)).view(4, 5, 32)  # a whole-token shift: a sub-grid
    torch.testing.assert_close(whole_patch, full[1:, 2:], rtol=0, atol=1e-6)
    half = sincos_2d(32, (5, 7), origin=(0.5, 0.0)).view(5, 7, 32)
    assert not torch.allclose(half, full)
    assert torch.equal(sincos_2d(32, (5, 7), origin=(0.0, 0.0)), sincos_2d(32, (5, 7)))


def test_the_denoiser_takes_another_grid_and_origin_and_its_own_grid_is_unchanged():
    torch.manual_seed(0)
    net = PODDenoiser(DenoiserConfig(rank=4, grid=(4, 6), width=16, depth=2, heads=2, window=2))
    for block in net.blocks:  # adaLN-Zero starts as the identity: give the blocks something to do
        torch.nn.init.normal_(block.ada[-1].weight, std=0.2)
    torch.nn.init.normal_(net.head.weight, std=0.2)
    x, c, t = torch.randn(2, 24, 4), torch.randn(2, 24, 4), torch.rand(2)
    out = net(x, c, t)
    torch.testing.assert_close(net(x, c, t, grid=(4, 6), origin=(0.0, 0.0)), out, rtol=0, atol=0)
    assert not torch.allclose(net(x, c, t, grid=(4, 6), origin=(0.25, 0.5)), out)
    shifted = net(x[:, :15], c[:, :15], t, grid=(3, 5), origin=(0.75, 0.25))
    assert shifted.shape == (2, 15, 4) and torch.isfinite(shifted).all()
    with pytest.raises(ValueError, match=r"L=15, r=4\] .* for the token grid \(3, 5\)"):
        net(x, c, t, grid=(3, 5))


def test_grid_shifts_are_every_offset_within_a_patch_for_a_shared_basis_only():
    lr, hr = fields()
    pipe = built(lr, hr)
    windows = pipe.training_windows()
    assert windows.count == 16 and windows.describe() == {"windows": 16, "crop": 0, "shifts": True}
    assert windows.geometry((0, -1)) == {"grid": (4, 7), "origin": (0.0, -0.25)}  # one more token, past the edge
    assert windows.geometry((-2, -3)) == {"grid": (5, 7), "origin": (-0.5, -0.75)}
    assert windows.geometry((0, 0)) == {"grid": (4, 6), "origin": (0.0, 0.0)}
    g = torch.Generator().manual_seed(0)
    assert {windows.draw(g) for _ in range(400)} == {(dy, dx) for dy in range(-3, 1) for dx in range(-3, 1)}
    assert built(lr, hr, grid_shifts=False).training_windows().count == 1
    assert built(lr, hr, basis="local").training_windows().count == 1  # a local basis belongs to its locations
    assert built(lr, hr, stride=2, rank=8).training_windows().count == 1  # overlapping patches
    one_row = built(lr[..., :1, :], hr[..., :4, :]).training_windows()
    assert one_row.count == 4 and one_row.geometry((0, -2))["grid"] == (1, 7)
    with pytest.raises(ValueError, match=r"window \(4, 0\): its top must be one of \[-3, -2, -1, 0\]"):
        pipe.window_tokens(hr[:2], lr[:2], None, (4, 0))


def test_crop_windows_lie_inside_the_field_at_whole_patches_or_less_than_a_patch_past_it_at_any_pixel():
    aligned = TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), crop=3)
    assert aligned.count == 2 * 4 and aligned.geometry((4, 12)) == {"grid": (3, 3), "origin": (1.0, 3.0)}
    with pytest.raises(ValueError, match="its left must be one of"):
        aligned.geometry((0, 2))  # whole patches only
    shifted = TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), crop=3, shifts=True)
    assert shifted.count == 11 * 19 and shifted.geometry((3, 11)) == {"grid": (3, 3), "origin": (0.75, 2.75)}
    rows, cols = shifted.crop_slices((-3, 15))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (-3, 9, 15, 27)  # 3 pixels past two edges
    g = torch.Generator().manual_seed(1)
    drawn = {shifted.draw(g) for _ in range(2000)}
    assert min(t for t, _ in drawn) == -3 and max(t for t, _ in drawn) == 7  # less than a patch past the field
    assert min(c for _, c in drawn) == -3 and max(c for _, c in drawn) == 15
    wide = TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), crop=5, shifts=True)  # wider than the rows
    assert wide.geometry((-2, 1)) == {"grid": (5, 5), "origin": (-0.5, 0.25)}  # rows: shifted; columns: cropped
    with pytest.raises(ValueError, match="crop must be 0"):
        TrainingWindows(grid=(4, 6), patch=4, size=(16, 24), crop=1)
    with pytest.raises(ValueError, match="crop must be .auto., 0"):
        PipelineConfig(crop=1)


def on_field(decoded, truth):
    """``decoded`` where ``truth`` (a window's crop, NaN past the field's edge) has pixels, else NaN."""
    return decoded.masked_fill(torch.isnan(truth), float("nan"))


def test_window_tokens_encode_the_crop_their_grid_covers():
    lr, hr = fields()
    cases = [({}, (-1, -2)), ({}, (-3, 0)), ({}, (0, -1)), ({"crop": 3}, (2, 5)), ({"crop": 3}, (-2, 14)),
             ({"crop": 2, "grid_shifts": False}, (4, 8))]
    for kw, window in cases:
        pipe = built(lr, hr, **kw)  # full rank: encode and decode are exact on the field's pixels
        x0, cond = pipe.window_tokens(hr[:3], lr[:3], None, window)
        (gh, gw), (dy, dx) = pipe.training_windows().geometry(window)["grid"], window
        rows, cols = slice(dy, dy + 4 * gh), slice(dx, dx + 4 * gw)
        assert x0.shape == cond.shape == (3, gh * gw, 16)
        truth = crop_field(pipe.standardise(hr[:3]), rows, cols)
        assert torch.isnan(truth).any() == (min(window) < 0 or window[1] + 4 * gw > W)
        torch.testing.assert_close(on_field(pipe.pod.decode(x0, image_size=(4 * gh, 4 * gw)), truth), truth,
                                   rtol=0, atol=1e-4, equal_nan=True)
        up = crop_field(upsample(pipe.standardise(lr[:3]), (H, W)), rows, cols)
        torch.testing.assert_close(on_field(pipe.pod.decode(cond, image_size=(4 * gh, 4 * gw)), up), up,
                                   rtol=0, atol=1e-4, equal_nan=True)
    pipe = built(lr, hr)
    x0, cond = pipe.window_tokens(hr[:3], lr[:3], None, (0, 0))  # the fitted grid: the usual tokens
    assert torch.equal(x0, pipe.target_tokens(hr[:3]).float()) and torch.equal(cond, pipe.condition_tokens(lr[:3]))


def test_a_residual_models_window_tokens_are_its_residual_and_condition_on_the_crop():
    lr, hr = fields()
    pipe = built(lr, hr, residual="ridge")
    mu = pipe.mean_model.predict(lr[:3])
    x0, cond = pipe.window_tokens(hr[:3], lr[:3], mu, (-2, -1))
    rows, cols = slice(-2, 18), slice(-1, 27)
    truth = crop_field(pipe.standardise(hr[:3] - mu), rows, cols)
    torch.testing.assert_close(on_field(pipe.pod.decode(x0, image_size=(20, 28)), truth), truth, rtol=0, atol=1e-4,
                               equal_nan=True)
    raw = pipe.pod.decode(cond * pipe.mean_model.cond_scale, standardized=False, image_size=(20, 28))
    field = crop_field((mu - pipe.mean_model.cond_mean) / pipe.data_scale.view(1, -1, 1, 1), rows, cols)
    torch.testing.assert_close(on_field(raw, field), field, rtol=0, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("kw, window, tokens", [({}, (-1, -3), [(0, 0), (1, 2), (2, 4), (4, 6)]),
                                                  ({"crop": 2}, (5, 9), [(0, 0), (1, 1), (0, 1)]),
                                                  ({"crop": 2}, (-3, 19), [(0, 0), (1, 1), (0, 1)])])
def test_window_covariate_features_average_the_cells_under_each_patch(kw, window, tokens):
    lr, hr = fields()
    g = torch.Generator().manual_seed(3)
    cov = torch.randn(N, 1, H // S, W // S, generator=g)
    pipe = built(torch.cat([lr, cov], 1), hr, covariates=["a"], **kw)
    _, cond = pipe.window_tokens(hr[:2], torch.cat([lr, cov], 1)[:2], None, window)
    std = (cov[:2] - pipe.covariate_offset) / pipe.covariate_scale
    gw = pipe.training_windows().geometry(window)["grid"][1]
    (dy, dx) = window
    for i, j in tokens:  # the pixels in the field: rows and columns past its edges are left out
        rows, cols = torch.arange(dy + 4 * i, dy + 4 + 4 * i), torch.arange(dx + 4 * j, dx + 4 + 4 * j)
        rows, cols = rows[(rows >= 0) & (rows < H)] // S, cols[(cols >= 0) & (cols < W)] // S
        expected = std[:, 0][:, rows][:, :, cols].mean((1, 2))  # the pixels' own cells, averaged
        torch.testing.assert_close(cond[:, i * gw + j, 16], expected, rtol=0, atol=1e-5)


def test_window_tokens_of_fields_with_land_are_finite():
    lr, hr = fields(land=True)
    pipe = built(lr, hr, rank=10)
    for shift in [(-1, -1), (-3, -2)]:
        x0, cond = pipe.window_tokens(hr[:4], lr[:4], None, shift)
        assert torch.isfinite(x0).all() and torch.isfinite(cond).all()


def test_the_trainer_draws_a_shift_per_batch_and_training_is_reproducible_and_resumes(tmp_path):
    lr, hr = fields()
    pipe = built(lr, hr)
    source = FieldTokens(pipe, lr, hr)
    trainer = Trainer(pipe)
    grids = set()
    for i in range(80):
        x0, cond, t, eps, geometry = trainer.batch(source, None, 4)
        grid = pipe.pod.grid if geometry is None else geometry["grid"]
        assert x0.shape == eps.shape == (4, grid[0] * grid[1], 16)
        grids.add(grid)
        if i < 8:
            trainer.step(x0, cond, t, eps, geometry)
    assert grids == {(4, 6), (5, 6), (4, 7), (5, 7)}
    once = PODiffPipeline(config())
    history = fit(once, lr, hr, progress=False)
    again = PODiffPipeline(config())
    assert fit(again, lr, hr, progress=False) == history
    first = PODiffPipeline(config())
    fit(first, lr, hr, steps=5, progress=False, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=5)
    resumed = PODiffPipeline(config())
    assert fit(resumed, lr, hr, progress=False, checkpoint=tmp_path / "ckpt.pt") == history
    out = once.sample(lr[:2], 3, seed=1)  # sampling is on the fitted grid
    assert out.mean.shape == hr[:2].shape and torch.isfinite(out.variance).all()


def test_a_model_trained_on_crops_samples_the_whole_field():
    lr, hr = fields()
    pipe = PODiffPipeline(config(crop=2, denoiser=dict(width=16, depth=2, heads=2, window=2)))
    build(pipe, lr, hr)
    source = FieldTokens(pipe, lr, hr)
    trainer = Trainer(pipe)
    for _ in range(10):  # every batch is a 2 × 2-token crop somewhere in the field
        x0, cond, t, eps, geometry = trainer.batch(source, None, 4)
        assert geometry["grid"] == (2, 2) and x0.shape == (4, 4, 16)
        assert -0.75 <= geometry["origin"][0] <= 2.75 and -0.75 <= geometry["origin"][1] <= 4.75
        trainer.step(x0, cond, t, eps, geometry)
    history = fit(PODiffPipeline(config(crop=2)), lr, hr, progress=False)
    assert len(history) == 12 and all(map(math.isfinite, history))
    out = pipe.sample(lr[:2], 3, seed=1)
    assert out.mean.shape == hr[:2].shape and torch.isfinite(out.mean).all()


def test_without_shifts_a_batch_draws_what_it_drew_before_the_option():
    lr, hr = fields()
    pipe = built(lr, hr, grid_shifts=False)
    trainer = Trainer(pipe)
    x0_all, cond_all = pipe.target_tokens(hr).float(), pipe.condition_tokens(lr).float()
    generator = torch.Generator().manual_seed(pipe.config.seed)  # the draws of a batch, by hand
    for _ in range(3):
        x0, cond, t, eps, geometry = trainer.batch(x0_all, cond_all, 4)
        idx = torch.randint(0, N, (4,), generator=generator)
        t_ref, eps_ref = draw_noise((4, 24, 16), pipe.schedule.t_max("v"), generator, "cpu", colour=pipe.token_noise)
        assert geometry is None and torch.equal(x0, x0_all[idx]) and torch.equal(t, t_ref) and torch.equal(eps, eps_ref)


def test_the_noise_correlation_moves_to_a_shifted_grid():
    colour = GridCorrelation(torch.tensor([0.5, -0.3]), torch.tensor([0.2, 0.7]), grid=(4, 6))
    assert colour.on_grid((4, 6)) is colour
    other = colour.on_grid((3, 5))
    assert other.grid == (3, 5) and torch.equal(other.rho_x, colour.rho_x) and colour.on_grid((3, 5)) is other
    eps = torch.randn(2, 15, 2)
    assert other(eps).shape == eps.shape


def test_the_automatic_crop_trains_large_grids_on_crops_with_windowed_attention():
    from podiff.cli import build_parser
    from podiff.config import AUTO_CROP, AUTO_CROP_ABOVE

    cfg = PipelineConfig()
    assert cfg.crop == "auto" and (AUTO_CROP, AUTO_CROP_ABOVE) == (16, 1024)
    assert cfg.resolved_crop((4, 108)) == cfg.resolved_crop((32, 32)) == 0  # the whole grid up to 1024 tokens
    assert cfg.resolved_crop((33, 32)) == 16 and PipelineConfig(crop=8).resolved_crop((64, 64)) == 8
    assert PipelineConfig(crop=0).resolved_crop((64, 64)) == 0
    assert cfg.denoiser_settings((32, 32)) == {} and cfg.denoiser_settings((64, 64)) == {"window": 8}
    assert PipelineConfig(denoiser={"window": 4}).denoiser_settings((64, 64)) == {"window": 4}
    assert PipelineConfig(crop=16).denoiser_settings((64, 64)) == {}  # a crop asked for: attention as asked
    for bad in (1, -2, "big", 2.5):
        with pytest.raises(ValueError, match="crop must be 'auto', 0 .the whole grid. or at least 2 tokens"):
            PipelineConfig(crop=bad)
    assert build_parser().parse_args(["train", "--data", "x.npz", "--out", "o", "--crop", "auto"]).crop == "auto"
    assert build_parser().parse_args(["train", "--data", "x.npz", "--out", "o", "--crop", "6"]).crop == 6
    g = torch.Generator().manual_seed(0)  # 33 × 32 tokens of 2 × 2 pixels: crops of 16 and 8 × 8-token windows
    hr = F.avg_pool2d(torch.randn(3, 1, 70, 68, generator=g), 5, stride=1)
    pipe = build(PODiffPipeline(PipelineConfig(residual="none", scale=2, patch_size=2, rank=2, basis="shared",
                                               denoiser=dict(width=16, depth=1, heads=2))), F.avg_pool2d(hr, 2), hr)
    assert tuple(pipe.pod.grid) == (33, 32) and pipe.denoiser.config.window == 8
    assert pipe.training_windows().describe() == {"windows": (33 - 16 + 1) * (32 - 16 + 1), "crop": 16,
                                                  "shifts": False}
    small = built(*fields(), grid_shifts=False)  # 4 × 6 tokens: the whole grid, global attention
    assert small.training_windows().count == 1 and small.denoiser.config.window == 0


def test_a_model_on_shifted_grids_fits_its_basis_on_patches_at_every_offset():
    from podiff import PatchPOD

    lr, hr = fields()
    for kw in ({}, {"grid_shifts": False, "member_grids": 2}):  # trained on shifted grids, or sampling them
        pipe = built(lr, hr, **kw)
        stride_one = PatchPOD(4, stride=1, rank=16, energy=None, basis="shared").fit(pipe.standardise(hr),
                                                                                     progress=False)
        assert pipe.pod.stride == 4
        torch.testing.assert_close(pipe.pod.eigenvalues, stride_one.eigenvalues, rtol=1e-4, atol=1e-7)
    plain = built(lr, hr, grid_shifts=False)
    grid_only = PatchPOD(4, rank=16, energy=None, basis="shared").fit(plain.standardise(hr), progress=False)
    torch.testing.assert_close(plain.pod.eigenvalues, grid_only.eigenvalues)
