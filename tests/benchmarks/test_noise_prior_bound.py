"""benchmarks/noise_prior_bound.py: the stationary covariance it builds, checked by hand, and
the script end to end on a tiny trained model, so the RESULTS bound cannot rot."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from utils import benchmark_script

from podiff.fitting import fit

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "noise_prior_bound.py"


def _module():
    return benchmark_script("noise_prior_bound")


def test_stationary_covariance_holds_each_lag_covariance_in_its_block():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 3 * 4, 2, generator=g, dtype=torch.float64)
    tokens[0, 5] = float("nan")  # an invalid token is left out of every pair
    cov = _module().stationary_covariance(tokens, (3, 4), lags=1)
    assert cov.shape == (24, 24) and torch.equal(cov, cov.T)
    z = tokens.view(5, 3, 4, 2)
    ok = ~torch.isnan(z).any(-1)
    pairs = [(z[n, y, x], z[n, y, x + 1]) for n in range(5) for y in range(3) for x in range(3)
             if ok[n, y, x] and ok[n, y, x + 1]]
    by_hand = sum(torch.outer(a, b) for a, b in pairs) / len(pairs)  # lag (0, +1)
    block = cov[(1 * 4 + 1) * 2 : (1 * 4 + 1) * 2 + 2, (1 * 4 + 2) * 2 : (1 * 4 + 2) * 2 + 2]
    torch.testing.assert_close(block, by_hand, rtol=1e-12, atol=1e-12)
    assert torch.all(cov[0:2, (2 * 4) * 2 : (2 * 4) * 2 + 2] == 0)  # lag (2, 0) is beyond ±1


@pytest.mark.slow
def test_script_runs_on_a_tiny_model(tmp_path):
    from podiff import PipelineConfig, PODiffPipeline

    g = torch.Generator().manual_seed(1)
    hr = F.avg_pool2d(torch.randn(12, 1, 20, 20, generator=g), 5, stride=1) * 3 + 10.0
    np.savez(tmp_path / "train.npz", hr=hr.numpy())
    pipe = PODiffPipeline(PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=4, rank=4,
                                         train_steps=2, batch_size=4, basis="shared"))
    from podiff.data.datasets import load_npz

    ds = load_npz(tmp_path / "train.npz", 4)
    fit(pipe, ds.lr, ds.hr, progress=False)
    pipe.save(tmp_path / "model")
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--data",
                           str(tmp_path / "train.npz"), "--split", "all", "--lags", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if "over the truth's" in line]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)
