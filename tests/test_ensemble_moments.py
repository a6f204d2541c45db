"""ensemble_moments against the float64 reference and torch.cov; diagonal variant; errors."""

import pytest
import torch

import podiff_kernels as pk
from podiff_kernels import dispatch, reference
from utils import assert_close


@pytest.mark.parametrize("diagonal", [False, True], ids=["block", "diagonal"])
@pytest.mark.parametrize("M, B, L, r", [(2, 1, 3, 5), (7, 2, 11, 3), (70, 1, 4, 20), (5, 1, 2, 70)])  # r = 70: 2×2 tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_values_match_reference(backend, name, dtype, M, B, L, r, diagonal):
    backend(name)
    g = torch.Generator().manual_seed(M + L)
    samples = 3.0 + torch.randn(M, B, L, r, generator=g, dtype=torch.float64)  # offset: no cancellation hidden
    mean, cov = pk.ensemble_moments(samples.to(dtype), diagonal=diagonal)
    assert dispatch.last_choice["ensemble_moments"].backend == name
    m0, c0 = reference.ensemble_moments(samples, diagonal)
    assert_close(mean, m0, dtype, f"mean[{name}]")
    assert_close(cov, c0, dtype, f"cov[{name}]")


def test_reference_matches_torch_cov():
    samples = torch.randn(9, 2, 3, 4, dtype=torch.float64)
    _, cov = reference.ensemble_moments(samples)
    for b in range(2):
        for l in range(3):
            assert torch.allclose(cov[b, l], torch.cov(samples[:, b, l].t()))


def test_chunked_torch_path_matches_unchunked():
    from importlib import import_module

    mod = import_module("podiff_kernels.ops.ensemble_moments")
    samples = torch.randn(5, 3, 17, 4, dtype=torch.float64)
    small = mod._moments_torch(samples, False, budget_bytes=200)
    full = mod._moments_torch(samples, False)
    assert torch.equal(small[1], full[1])


def test_errors():
    with pytest.raises(ValueError, match="at least M = 2 members .* got M = 1"):
        pk.ensemble_moments(torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\[M, B, L, r\]; got 3 dims"):
        pk.ensemble_moments(torch.randn(5, 3, 4))
    with pytest.raises(TypeError, match="floating"):
        pk.ensemble_moments(torch.ones(5, 1, 3, 4, dtype=torch.int32))


def test_opcheck():
    torch.library.opcheck(torch.ops.podiff.ensemble_moments.default, (torch.randn(6, 2, 5, 3), False))
    torch.library.opcheck(torch.ops.podiff.ensemble_moments.default, (torch.randn(6, 2, 5, 3), True))
