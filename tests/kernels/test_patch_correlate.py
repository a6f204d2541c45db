"""patch_correlate (the basis/mean gradient building block): every backend against the reference."""

import pytest
import torch
from cases import SHAPE_IDS, SHAPES, make_case
from utils import assert_close

import podiff_kernels as pk
from podiff_kernels import dispatch, reference


@pytest.mark.parametrize("local", [False, True], ids=["pooled", "local"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_values_match_reference(backend, name, dtype, shape, local):
    backend(name)
    x, _, _, coeffs = make_case(shape, local, "none", r=7)
    p, s = shape[4], shape[5]
    expected = reference.patch_correlate(x, coeffs, p, s, local)
    got = pk.patch_correlate(x.to(dtype), coeffs.to(dtype), p, s, local=local)
    assert dispatch.last_choice["patch_correlate"].backend == name
    # Sums over B*L rows: scale the tolerance check by the magnitude of the sum.
    scale = max(1.0, expected.abs().max().item())
    assert_close(got / scale, expected / scale, dtype, f"correlate[{name}]")


def test_triton_split_k_many_rows(backend):
    """Enough rows that the pooled Triton kernel splits the reduction into several partials."""
    backend("triton")
    x = torch.randn(4, 1, 41, 41, dtype=torch.float64)
    g = torch.randn(4, 19 * 19, 3, dtype=torch.float64)
    got = pk.patch_correlate(x, g, 5, 2)
    assert_close(got, reference.patch_correlate(x, g, 5, 2), torch.float64, "split-K")


def test_grad_shape_error():
    with pytest.raises(ValueError, match=r"grad must have shape \[B, L, r\] = \[2, 30, r\]; got \(2, 29, 4\)"):
        pk.patch_correlate(torch.randn(2, 1, 13, 11), torch.randn(2, 29, 4), 3, 2)
