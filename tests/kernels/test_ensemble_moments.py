"""ensemble_moments against the float64 reference and torch.cov; diagonal variant; errors."""

import pytest
import torch
from utils import assert_close

import podiff_kernels as pk
from podiff_kernels import dispatch, reference


@pytest.mark.parametrize("diagonal", [False, True], ids=["block", "diagonal"])
# r = 70: 2×2 tiles
@pytest.mark.parametrize("M, B, L, r", [(2, 1, 3, 5), (7, 2, 11, 3), (70, 1, 4, 20), (5, 1, 2, 70)])
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
        for loc in range(3):
            assert torch.allclose(cov[b, loc], torch.cov(samples[:, b, loc].t()))


def test_chunked_torch_path_matches_unchunked(monkeypatch):
    from importlib import import_module

    mod = import_module("podiff_kernels.ops.ensemble_moments")
    samples = torch.randn(5, 3, 17, 4, dtype=torch.float64)
    full = mod._moments_torch(samples, False)
    monkeypatch.setattr(mod, "CHUNK_FLOOR", 1)  # chunks of 3 tokens here (51 tokens / 16)
    assert mod.chunk_tokens(5, 51, 4, 8) == 3
    for diagonal in (False, True):
        small = mod._moments_torch(samples, diagonal)
        want = reference.ensemble_moments(samples, diagonal)
        torch.testing.assert_close(small[1], want[1], rtol=1e-12, atol=1e-13)
    assert torch.equal(mod._moments_torch(samples, False)[0], full[0])


PEAK_RSS = """
import torch, podiff_kernels as pk
samples = torch.randn(64, 4, 1024, 16)                      # 16 MiB of members
pk.ensemble_moments(samples[:, :1, :8])                     # imports and first-call set-up done
def rss(field):
    return next(int(loc.split()[1]) for loc in open("/proc/self/status") if loc.startswith(field)) * 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")               # reset the high-water mark to now
mean, cov = pk.ensemble_moments(samples)
print(rss("VmHWM:") - before, samples.numel() * 4, (mean.numel() + cov.numel()) * 4)
"""


def test_torch_path_temporaries_are_a_small_fraction_of_the_input():
    """The members are centred a chunk at a time: the process's resident high-water mark grows
    by the outputs and at most an eighth of the input more (one centred copy would be the
    input's size). Measured as a user sees it, in a fresh process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PEAK_RSS], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "clear_refs" in done.stderr:
        pytest.skip("this kernel cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr[-2000:]
    grown, input_bytes, outputs = (int(v) for v in done.stdout.split()[-3:])
    assert grown - outputs <= input_bytes / 8, (grown, outputs, input_bytes)


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
