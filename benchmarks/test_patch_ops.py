"""patch_encode / patch_decode vs what a user would otherwise write, same inputs, same run.

Shapes from the foundation issue: B=8, C=3, 512x512, p=8, s=4, r=32 (shared basis);
and a local basis (one basis per location) at B=8, C=1, 256x256, p=8, s=4, r=16.
"""

import pytest
import torch
import torch.nn.functional as F

import podiff_kernels as pk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # inputs live here; conftest syncs timings


def _grid(H, p, s):
    n = (H - p) // s + 1
    return n * n


def _inputs(B, C, H, p, s, r, local):
    g = torch.Generator().manual_seed(0)
    D, L = C * p * p, _grid(H, p, s)
    x = torch.randn(B, C, H, H, generator=g)
    basis = torch.randn(*((L,) if local else ()), D, r, generator=g)
    mean = torch.randn(D, generator=g)
    coeffs = torch.randn(B, L, r, generator=g)
    return [t.to(DEVICE) for t in (x, basis, mean, coeffs)]


CASES = {
    "shared B8 C3 512 p8 s4 r32": (8, 3, 512, 8, 4, 32, False),
    "local B8 C1 256 p8 s4 r16": (8, 1, 256, 8, 4, 16, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["podiff", "unfold_matmul"])
def test_patch_encode(compare, case, provider):
    B, C, H, p, s, r, local = CASES[case]
    x, basis, mean, _ = _inputs(B, C, H, p, s, r, local)
    if provider == "podiff":
        fn = lambda: pk.patch_encode(x, basis, mean, p, s)  # noqa: E731
    elif local:
        fn = lambda: torch.einsum("bld,ldr->blr", F.unfold(x, p, stride=s).transpose(1, 2) - mean, basis)  # noqa: E731
    else:
        fn = lambda: (F.unfold(x, p, stride=s).transpose(1, 2) - mean) @ basis  # noqa: E731
    out = compare(f"patch_encode {case}", provider, fn, baseline=provider != "podiff")
    assert out.shape == (B, _grid(H, p, s), r)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["podiff", "fold"])
def test_patch_decode(compare, case, provider):
    B, C, H, p, s, r, local = CASES[case]
    _, basis, mean, coeffs = _inputs(B, C, H, p, s, r, local)

    def fold_baseline():
        cols = (torch.einsum("blr,ldr->bld", coeffs, basis) if local else coeffs @ basis.t()) + mean
        cols = cols.transpose(1, 2)
        return F.fold(cols, (H, H), p, stride=s) / F.fold(torch.ones_like(cols), (H, H), p, stride=s)

    if provider == "podiff":
        fn = lambda: pk.patch_decode(coeffs, basis, mean, (H, H), p, s)  # noqa: E731
    else:
        fn = fold_baseline
    out = compare(f"patch_decode {case}", provider, fn, baseline=provider != "podiff")
    assert out.shape == (B, C, H, H)
