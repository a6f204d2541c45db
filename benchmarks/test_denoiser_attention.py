"""Windowed against global attention in the denoiser, same run: one training step (forward and
backward) and one sampling call (forward) of the ``tiny`` ViT on the token grid of a 72 × 144
field (18 × 36 tokens, p = 4) and of a 256 × 256 field (64 × 64 tokens); the ratio table shows
what the windows save; and a windowed call on a 1024² field run band by band against the whole
grid at once. ``benchmarks/denoiser_scaling.py`` and ``benchmarks/domain_scaling.py`` give the
growth with the area.
"""

import pytest
import torch

from podiff.diffusion.denoiser import DenoiserConfig, PODDenoiser

GRIDS = {"72x144": (18, 36), "256x256": (64, 64)}
PROVIDERS = {"window 8": 8, "global": 0}


def _net(grid, window):
    torch.manual_seed(0)
    net = PODDenoiser(DenoiserConfig.preset("tiny", rank=8, grid=grid, cond_rank=8, window=window))
    with torch.no_grad():  # leave adaLN-Zero's start, so that every block does its work
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("size", list(GRIDS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_training_step(compare, provider, size):
    grid = GRIDS[size]
    net = _net(grid, PROVIDERS[provider])
    batch = 8 if size == "72x144" else 2
    x, c, t = (torch.randn(batch, grid[0] * grid[1], 8), torch.randn(batch, grid[0] * grid[1], 8), torch.rand(batch))

    def step():
        loss = net(x, c, t).square().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)
        return loss.detach()

    value = compare(f"denoiser training step, batch {batch}, {size} pixels", provider, step,
                    baseline=provider == "global", rounds=3)
    assert torch.isfinite(value)


@pytest.mark.parametrize("size", list(GRIDS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_sampling_call(compare, provider, size):
    grid = GRIDS[size]
    net = _net(grid, PROVIDERS[provider])
    x, c, t = (torch.randn(4, grid[0] * grid[1], 8), torch.randn(4, grid[0] * grid[1], 8), torch.rand(4))

    @torch.no_grad()
    def call():
        return net(x, c, t)

    out = compare(f"denoiser call, 4 members, {size} pixels", provider, call, baseline=provider == "global", rounds=3)
    assert out.shape == x.shape


@pytest.mark.parametrize("provider", ["bands", "whole grid"])
def test_sampling_call_band_by_band(compare, provider, monkeypatch):
    """A windowed block on a large grid runs band by band (``denoiser.window_bands``): the same sums,
    each band's activations in cache. One member of a 1024² field (256 × 256 tokens), window 8."""
    import podiff.diffusion.denoiser as denoiser

    if provider == "whole grid":
        monkeypatch.setattr(denoiser, "BAND_TOKENS", 1 << 30)
    grid = (256, 256)
    net = _net(grid, 8)
    x, c, t = torch.randn(1, grid[0] * grid[1], 8), torch.randn(1, grid[0] * grid[1], 8), torch.rand(1)

    @torch.no_grad()
    def call():
        return net(x, c, t)

    out = compare("windowed denoiser call, 1 member, 1024² pixels", provider, call, baseline=provider == "whole grid",
                  rounds=3)
    assert out.shape == x.shape
