"""Test helpers: dtype-dependent tolerances with the worst index in the failure message, smooth
random fields and a tiny model config for the baseline tests, the ``podiff`` command run in
process, and a script of ``benchmarks/`` imported as a module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

# (atol, rtol) of an implementation in this dtype, against float64 truth, for O(1) data.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """``|a − e| <= atol + rtol·|e|`` everywhere; on failure reports the worst element and its index."""
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values in the result"
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if (excess > 0).any():
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"worst at {idx}: got {a[idx].item():.10g}, expected {e[idx].item():.10g}"
        )


def orthonormal(D: int, r: int, *lead: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Random ``[*lead, D, r]`` with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(*lead, D, max(r, 1), generator=g, dtype=torch.float64))[0]
    return q[..., :r].to(dtype)


def run_command(capsys, *argv):
    """``podiff *argv`` in process: ``(exit code, stdout, stderr)``."""
    from podiff.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def smooth(n, seed, size=32):
    """``n`` smooth random fields ``[n, 1, size, size]`` (white noise blurred twice)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size + 8, size + 8, generator=g)
    return F.avg_pool2d(F.avg_pool2d(x, 5, stride=1), 5, stride=1) * 5


def smooth_pairs(n: int, size: tuple[int, int], scale: int, seed: int = 0, land: bool = False):
    """``(lr, hr)``: ``n`` smooth fields of ``size`` and their ``scale``-block means; with ``land``
    a corner of NaN (``lr`` from the ocean pixels, 0 where none)."""
    H, W = size
    g = torch.Generator().manual_seed(seed)
    hr = F.avg_pool2d(torch.randn(n, 1, H + 4, W + 4, generator=g), 5, stride=1) * 3
    if land:
        hr[:, :, :5, :7] = float("nan")
    lr = F.avg_pool2d(hr, scale) if not land else torch.nan_to_num(F.avg_pool2d(torch.nan_to_num(hr), scale))
    return lr, hr


def tiny_baseline_config(**kw):
    """A tiny diffusion model of the fields themselves, ×4, for the baseline tests."""
    from podiff import PipelineConfig

    return PipelineConfig(**{**dict(residual="none", antithetic=False, scale=4, patch_size=4, rank=8, train_steps=20,
                                    batch_size=16, sample_steps=3, denoiser=dict(width=32, depth=1, heads=2)), **kw})



def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
