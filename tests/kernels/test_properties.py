"""Property-based checks (hypothesis) of the patch ops over random valid shapes, and of the
documented errors over invalid ones."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import podiff_kernels as pk
from podiff_kernels import reference


@st.composite
def geometry(draw):
    p = draw(st.integers(1, 5))
    s = draw(st.integers(1, p))
    nh, nw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    C = draw(st.sampled_from([1, 2, 3]))
    B = draw(st.integers(1, 3))
    H, W = p + (nh - 1) * s, p + (nw - 1) * s
    D = C * p * p
    r = draw(st.integers(1, D))
    local = draw(st.booleans())
    return B, C, H, W, p, s, r, local


SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@SETTINGS
@given(geometry(), st.sampled_from(["torch", "cpp"]))
def test_encode_decode_match_reference_on_random_shapes(g, name):
    B, C, H, W, p, s, r, local = g
    L = ((H - p) // s + 1) * ((W - p) // s + 1)
    gen = torch.Generator().manual_seed(B * 1000 + H * 10 + W)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    basis = torch.randn(*((L,) if local else ()), C * p * p, r, generator=gen, dtype=torch.float64)
    mean = torch.randn(*((L,) if local else ()), C * p * p, generator=gen, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PODIFF_BACKEND", name)
        coeffs = pk.patch_encode(x, basis, mean, p, s)
        image = pk.patch_decode(coeffs, basis, mean, (H, W), p, s)
    torch.testing.assert_close(coeffs, reference.patch_encode(x, basis, mean, p, s), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(image, reference.patch_decode(coeffs, basis, mean, (H, W), p, s),
                               rtol=1e-10, atol=1e-10)


@SETTINGS
@given(geometry())
def test_patch_stats_match_reference_on_random_shapes(g):
    B, C, H, W, p, s, _, local = g
    gen = torch.Generator().manual_seed(H * 100 + W)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) + 2.0
    stats = pk.patch_stats(x, p, s, local=local)
    count, _, m2 = reference.patch_stats.patch_stats(x, None, p, s, local)
    torch.testing.assert_close(stats.covariance(), reference.patch_stats.covariance(count, m2),
                               rtol=1e-10, atol=1e-10)


@SETTINGS
@given(st.integers(2, 6), st.integers(1, 6), st.integers(1, 5))
def test_uncovered_sizes_raise_the_documented_error(p, extra, s):
    s = min(s, p)
    H = p + extra
    x = torch.randn(1, 1, H, p)
    basis = torch.randn(p * p, 2)
    if (H - p) % s:
        with pytest.raises(ValueError, match=f"image height {H} is not covered by patch_size={p}, stride={s}"):
            pk.patch_encode(x, basis, None, p, s)
    else:
        assert pk.patch_encode(x, basis, None, p, s).shape[1] == (H - p) // s + 1


@SETTINGS
@given(st.integers(2, 6), st.integers(1, 3))
def test_stride_larger_than_patch_and_small_images_raise(p, over):
    x = torch.randn(1, 1, p + 4, p + 4)
    with pytest.raises(ValueError, match=f"stride must be <= patch_size.*stride={p + over}, patch_size={p}"):
        pk.patch_encode(x, torch.randn(p * p, 1), None, p, p + over)
    small = torch.randn(1, 1, p - 1, p + 4)
    with pytest.raises(ValueError, match=f"image height {p - 1} is smaller than patch_size {p}"):
        pk.patch_encode(small, torch.randn(p * p, 1), None, p, 1)
