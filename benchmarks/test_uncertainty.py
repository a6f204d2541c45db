"""Analytic pixel mean + variance from latent samples vs decoding every ensemble member.

Shapes from the uncertainty issue: B=4, C=1, 256x256, p=8 (s=p), r=16, M=64.
"""

import pytest
import torch
import torch.nn.functional as F
from _measure import peak_rss_mb

import podiff_kernels as pk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # inputs live here; conftest syncs timings
M, B, C, H, p, r = 64, 4, 1, 256, 8, 16
L, D = (H // p) ** 2, C * p * p


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0].float()
    mean = torch.randn(D, generator=g)
    samples = torch.randn(M, B, L, r, generator=g)
    return basis.to(DEVICE), mean.to(DEVICE), samples.to(DEVICE)


def decode_every_member(samples, basis, mean):
    decoded = pk.patch_decode(samples.reshape(M * B, L, r), basis, mean, (H, H), p).reshape(M, B, C, H, H)
    return decoded.mean(0), decoded.var(0)


def _analytic(diagonal, samples, basis, mean):
    m, v = pk.ensemble_moments(samples, diagonal=diagonal)
    return pk.decode_moments(m, v, basis, mean, (H, H), p)


@pytest.mark.parametrize("mode", ["diagonal", "block"])
@pytest.mark.parametrize("provider", ["analytic", "decode_members"])
def test_uncertainty_from_ensemble(compare, inputs, mode, provider):
    basis, mean, samples = inputs
    if provider == "analytic":
        fn = lambda: _analytic(mode == "diagonal", samples, basis, mean)  # noqa: E731
    else:
        fn = lambda: decode_every_member(samples, basis, mean)  # noqa: E731
    group = f"pixel mean+var ({mode}) M{M} B{B} C{C} {H} p{p} r{r}"
    pm, pv = compare(group, provider, fn, baseline=provider == "decode_members")
    assert pm.shape == pv.shape == (B, C, H, H)


@pytest.mark.parametrize("provider", ["podiff", "einsum_fold"])
def test_propagate_variance_block(compare, inputs, provider):
    basis, _, samples = inputs
    _, cov = pk.ensemble_moments(samples)

    def einsum_fold():
        per_patch = torch.einsum("dk,blkm,dm->bld", basis, cov, basis)
        ones = torch.ones(1, D, L, device=cov.device)
        n = F.fold(ones, (H, H), p, stride=p)
        return F.fold(per_patch.transpose(1, 2), (H, H), p, stride=p) / n**2

    fn = (lambda: pk.propagate_variance(cov, basis, (H, H), p)) if provider == "podiff" else einsum_fold
    out = compare(f"propagate_variance block B{B} C{C} {H} p{p} r{r}", provider, fn,
                  baseline=provider != "podiff", rounds=50)
    assert out.shape == (B, C, H, H)


RSS_SETUP = f"""
import torch, podiff_kernels as pk
M, B, C, H, p, r = {M}, {B}, {C}, {H}, {p}, {r}
L, D = (H // p) ** 2, C * p * p
g = torch.Generator().manual_seed(0)
basis = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0].float()
mean = torch.randn(D, generator=g)
samples = torch.randn(M, B, L, r, generator=g)
"""
RSS_CALLS = {
    "analytic": "m, v = pk.ensemble_moments(samples)\npm, pv = pk.decode_moments(m, v, basis, mean, (H, H), p)",
    "decode_members": "d = pk.patch_decode(samples.reshape(M * B, L, r), basis, mean, (H, H), p).reshape(M, B, C, H, "
                      "H)\n"
                      "pm, pv = d.mean(0), d.var(0)",
}


@pytest.mark.skipif(DEVICE != "cpu", reason="the process high-water mark measures host memory")
def test_uncertainty_peak_rss(benchmark):
    """Peak resident memory as a user sees it: each way in a fresh process (warmed up on a slice
    of the members), the high-water mark's growth over one call."""
    def warmup(call):  # the same call on two members of one image, then the full inputs back
        return f"full = samples\nsamples, M, B = samples[:2, :1], 2, 1\n{call}\nsamples, M, B = full, {M}, {B}\n"

    grown = {k: peak_rss_mb(RSS_SETUP, call, warmup(call)) for k, call in RSS_CALLS.items()}
    if None in grown.values():
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    ratio = grown["decode_members"] / grown["analytic"]
    benchmark.extra_info.update(**{f"{k}_peak_rss_mb": round(v, 2) for k, v in grown.items()}, ratio=round(ratio, 1))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"peak RSS growth, block mean+var M{M} B{B} {H}² p{p} r{r}: analytic {grown['analytic']:.1f} MiB, "
          f"decoding every member {grown['decode_members']:.1f} MiB ({ratio:.1f}x)")
    assert grown["analytic"] < grown["decode_members"]
