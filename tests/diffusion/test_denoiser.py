"""The ViT denoiser: shapes, adaLN-Zero start (output 0), presets and parameter counts, per-token
noise input, position embedding, errors, and torch.compile of a forward/backward pass."""

import pytest
import torch

from podiff.diffusion.denoiser import PRESETS, DenoiserConfig, MLPDenoiser, PODDenoiser, sincos_2d


def test_shapes_and_zero_initial_output():
    cfg = DenoiserConfig.preset("tiny", rank=7, grid=(3, 5), cond_rank=9)
    net = PODDenoiser(cfg)
    out = net(torch.randn(2, 15, 7), torch.randn(2, 15, 9), torch.rand(2))
    assert out.shape == (2, 15, 7)
    assert (out == 0).all()  # zero-initialised head: the first prediction is 0 (v = 0 is the prior mean)


def test_per_token_noise_input_and_training_signal():
    cfg = DenoiserConfig(rank=4, grid=(2, 2), width=32, depth=2, heads=2, noise_input="per_token")
    net = PODDenoiser(cfg)
    x, c = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    lam = torch.randn(3, 4, 4) * 5
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    target = torch.randn(3, 4, 4)
    first = None
    for _ in range(30):
        loss = (net(x, c, lam) - target).pow(2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_presets_and_parameter_counts():
    counts = {name: PODDenoiser(DenoiserConfig.preset(name, rank=16, grid=(8, 8))).num_parameters()
              for name in PRESETS}
    assert counts["tiny"] < counts["small"] < counts["paper"]
    assert 1e5 < counts["tiny"] < 1e6 and counts["paper"] > 1e7
    with pytest.raises(ValueError, match="preset must be one of"):
        DenoiserConfig.preset("huge", rank=4, grid=(2, 2))


def test_position_embedding_distinguishes_locations():
    pos = sincos_2d(32, (4, 6))
    assert pos.shape == (24, 32)
    assert torch.cdist(pos, pos).fill_diagonal_(1.0).min() > 1e-3


def test_errors():
    with pytest.raises(ValueError, match="width must be a multiple of heads"):
        DenoiserConfig(rank=4, grid=(2, 2), width=30, heads=4)
    with pytest.raises(ValueError, match="noise_input must be 'time' or 'per_token'"):
        DenoiserConfig(rank=4, grid=(2, 2), noise_input="sigma")
    net = PODDenoiser(DenoiserConfig(rank=4, grid=(2, 2), width=32, depth=1, heads=2))
    with pytest.raises(ValueError, match=r"x_t must be \[B, L=4, r=4\]"):
        net(torch.randn(1, 5, 4), torch.randn(1, 5, 4), torch.rand(1))


def test_mlp_denoiser_for_one_token():
    net = MLPDenoiser(DenoiserConfig(rank=20, grid=(1, 1), width=32, depth=2, heads=2))
    assert net(torch.randn(3, 1, 20), torch.randn(3, 1, 20), torch.rand(3)).shape == (3, 1, 20)
    with pytest.raises(ValueError, match="one token"):
        MLPDenoiser(DenoiserConfig(rank=4, grid=(2, 2), width=32, heads=2))


@pytest.mark.slow
def test_forward_backward_compiles():
    torch.manual_seed(0)
    net = PODDenoiser(DenoiserConfig(rank=8, grid=(4, 4), width=32, depth=2, heads=2))
    x, c, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8), torch.rand(2)
    with torch.no_grad():  # make the output non-trivial
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    eager = net(x, c, t)
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x, c, t)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def _window_reference(q, k, v, grid, window, shift):
    """Full attention with an explicit [L, L] mask: token i sees j when the shifted partition puts
    them in the same window (float64, independent of the windowed reshaping)."""
    nH, nW = grid
    rows, cols = torch.meshgrid(torch.arange(nH), torch.arange(nW), indexing="ij")
    label = ((rows.flatten() + shift) // window) * 10_000 + (cols.flatten() + shift) // window
    mask = label[:, None] == label[None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("grid,window,shift", [((5, 7), 3, 0), ((5, 7), 3, 1), ((6, 6), 3, 0), ((4, 9), 4, 2),
                                               ((1, 10), 4, 2)])
def test_window_attention_matches_a_masked_reference(grid, window, shift):
    from podiff.diffusion.denoiser import window_attention

    g = torch.Generator().manual_seed(0)
    L = grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, L, 4, generator=g, dtype=torch.float64) for _ in range(3))
    packed = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4)  # [B, L, 3, h, d]
    torch.testing.assert_close(window_attention(packed, grid, window, shift),
                               _window_reference(q, k, v, grid, window, shift).transpose(1, 2))


def test_windowed_denoiser_is_local_and_shifted_blocks_connect_windows():
    torch.manual_seed(0)
    cfg = DenoiserConfig(rank=3, grid=(8, 8), width=16, depth=1, heads=2, window=4)
    net = PODDenoiser(cfg)
    with torch.no_grad():  # leave adaLN-Zero's start, so that attention reaches the output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, c, t = torch.randn(1, 64, 3), torch.randn(1, 64, 3), torch.rand(1)
    far = x.clone()
    far[0, 63] += 10.0  # token (7, 7): another window than token (0, 0)
    near = x.clone()
    near[0, 9] += 10.0  # token (1, 1): the same window
    out = net(x, c, t)
    assert torch.equal(net(far, c, t)[0, 0], out[0, 0])
    assert not torch.equal(net(near, c, t)[0, 0], out[0, 0])
    # Two blocks, the second shifted by 2: token (3, 3) now reaches token (4, 4) across the first partition's edge.
    net2 = PODDenoiser(DenoiserConfig(rank=3, grid=(8, 8), width=16, depth=2, heads=2, window=4))
    with torch.no_grad():
        for p in net2.parameters():
            p.add_(0.1 * torch.randn_like(p))
    moved = x.clone()
    moved[0, 4 * 8 + 4] += 10.0
    assert not torch.equal(net2(moved, c, t)[0, 3 * 8 + 3], net2(x, c, t)[0, 3 * 8 + 3])


def test_window_covering_the_grid_is_global_attention():
    torch.manual_seed(0)
    cfg = DenoiserConfig(rank=3, grid=(4, 6), width=16, depth=2, heads=2, window=0)
    glob = PODDenoiser(cfg)
    wide = PODDenoiser(DenoiserConfig(**{**cfg.to_dict(), "window": 6}))
    wide.load_state_dict(glob.state_dict())
    with torch.no_grad():
        for p in glob.parameters():
            p.add_(0.1 * torch.randn_like(p))
    wide.load_state_dict(glob.state_dict())
    x, c, t = torch.randn(2, 24, 3), torch.randn(2, 24, 3), torch.rand(2)
    torch.testing.assert_close(wide(x, c, t), glob(x, c, t))


def test_window_config():
    assert DenoiserConfig.preset("tiny", rank=4, grid=(2, 2)).window == 0  # global unless asked
    assert DenoiserConfig.preset("tiny", rank=4, grid=(2, 2), window=8).window == 8
    saved = DenoiserConfig(rank=4, grid=(2, 2)).to_dict()
    saved.pop("window")  # a config saved before windows existed: global attention, as trained
    assert DenoiserConfig(**saved).window == 0
    for bad in (1, -2):
        with pytest.raises(ValueError, match=f"window must be 0 .* got {bad}"):
            DenoiserConfig(rank=4, grid=(2, 2), window=bad)


@pytest.mark.parametrize("grid,window,shift,tokens", [((20, 5), 4, 0, 40), ((20, 5), 4, 2, 40), ((21, 3), 3, 1, 1),
                                                      ((9, 9), 4, 2, 10_000)])
def test_window_bands_hold_whole_windows_and_cover_the_grid(grid, window, shift, tokens):
    from podiff.diffusion.denoiser import window_bands

    bands = window_bands(grid, window, shift, tokens)
    assert bands[0][0] == 0 and bands[-1][1] == grid[0]
    assert all(a[1] == b[0] for a, b in zip(bands[:-1], bands[1:], strict=True))  # contiguous, no overlap
    for r0, _ in bands[1:]:  # each later band starts on an edge of the shifted partition
        assert (r0 + shift) % window == 0
    if tokens >= grid[0] * grid[1]:
        assert bands == [(0, grid[0])]


@pytest.mark.parametrize("noise_input", ["time", "per_token"])
def test_a_large_windowed_grid_run_band_by_band_is_the_whole_grid_run(monkeypatch, noise_input):
    import podiff.diffusion.denoiser as denoiser

    torch.manual_seed(0)
    net = PODDenoiser(DenoiserConfig(rank=3, grid=(13, 11), width=16, depth=3, heads=2, window=3,
                                     noise_input=noise_input)).double()
    with torch.no_grad():  # leave adaLN-Zero's start, so that every block reaches the output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, c = torch.randn(2, 143, 3, dtype=torch.float64), torch.randn(2, 143, 3, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64) if noise_input == "time" else torch.randn(2, 143, 3, dtype=torch.float64)
    whole = net(x, c, t)
    calls = []
    original = denoiser.DiTBlock._band
    monkeypatch.setattr(denoiser.DiTBlock, "_band", lambda self, *a: calls.append(a[2]) or original(self, *a))
    monkeypatch.setattr(denoiser, "BAND_TOKENS", 20)  # bands of one row of windows: 3 rows of 11 tokens
    banded = net(x, c, t)
    assert len(calls) > 3 * 3 and {g[1] for g in calls} == {11} and max(g[0] for g in calls) <= 3
    torch.testing.assert_close(banded, whole, rtol=1e-12, atol=1e-12)
    (banded.square().sum()).backward()  # training runs band by band too
    assert all(p.grad is not None for p in net.blocks.parameters())
