"""How much small-scale power members drawn from a Gaussian noise prior would have.

Fits three Gaussians to a trained model's residual tokens on its training fields and decodes
draws from each: white (each mode's variance), the per-mode grid AR(1) that ``podiff`` uses
(``podiff.diffusion.token_noise.GridCorrelation``), and every r×r cross-covariance at lags up to ±K
patches, stationary on the grid (dense, so for grids of a few thousand token entries). Prints
each one's power above k = 1/4 over that of the decoded training tokens
(``metrics.high_wavenumber_power_ratio``), and a check that should give about 1: random
combinations of the training tokens themselves. A perfect sampler from that prior gives its
ratio; ``benchmarks/RESULTS.md`` compares it with the trained members.

    python benchmarks/noise_prior_bound.py --model RUN/model --data train.npz --split all --lags 2
    python benchmarks/noise_prior_bound.py --model demo_images/run/model --data images
"""

from __future__ import annotations

import argparse

import torch

from podiff.data import datasets as data
from podiff.diffusion.token_noise import GridCorrelation
from podiff.evaluation.metrics import high_wavenumber_power_ratio
from podiff.model.pipeline import PODiffPipeline


def stationary_covariance(tokens: torch.Tensor, grid: tuple[int, int], lags: int) -> torch.Tensor:
    """The dense ``[L·r, L·r]`` covariance whose block for patches ``a``, ``b`` is the tokens'
    r×r lag covariance at ``b − a`` (pairwise-complete over valid tokens), zero beyond ``lags``."""
    N, L, r = tokens.shape
    nH, nW = grid
    z = torch.nan_to_num(tokens.double()).view(N, nH, nW, r)
    valid = (~torch.isnan(tokens).any(-1)).double().view(N, nH, nW)
    lag_cov = {}
    for dy in range(-lags, lags + 1):
        for dx in range(-lags, lags + 1):
            ya, yb, xa, xb = max(0, -dy), min(nH, nH - dy), max(0, -dx), min(nW, nW - dx)
            if ya >= yb or xa >= xb:
                continue
            w = valid[:, ya:yb, xa:xb] * valid[:, ya + dy : yb + dy, xa + dx : xb + dx]
            a, b = z[:, ya:yb, xa:xb], z[:, ya + dy : yb + dy, xa + dx : xb + dx]
            lag_cov[dy, dx] = torch.einsum("nyxa,nyxb->ab", a * w[..., None], b) / w.sum().clamp_min(1)
    full = torch.zeros(L * r, L * r, dtype=torch.float64)
    for y in range(nH):
        for x in range(nW):
            for (dy, dx), c in lag_cov.items():
                if 0 <= y + dy < nH and 0 <= x + dx < nW:
                    i, j = (y * nW + x) * r, ((y + dy) * nW + x + dx) * r
                    full[i : i + r, j : j + r] = c
    return 0.5 * (full + full.T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model folder (RUN/model)")
    parser.add_argument("--data", required=True, help="the training data: an .npz or a packaged dataset name")
    parser.add_argument("--split", default="train", help="fields of --data to fit on (default train)")
    parser.add_argument("--lags", type=int, default=2, help="the stationary covariance's reach in patches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    pipe = PODiffPipeline.load(args.model)
    lr, hr, _ = data.load(args.data, pipe.config.scale).split(args.split)
    tokens = pipe.target_tokens(hr, lr).double()
    N, L, r = tokens.shape
    grid = pipe.pod.grid

    def decode(t: torch.Tensor) -> torch.Tensor:
        return pipe.pod.decode(t.float().reshape(-1, L, r))

    truth = decode(torch.nan_to_num(tokens))
    scale = torch.nan_to_num(tokens).square().mean((0, 1)).sqrt().float()
    cov = stationary_covariance(tokens, grid, args.lags)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    root = vectors * eigenvalues.clamp_min(0).sqrt()
    draws = {
        "white, each mode's variance": decode(torch.randn(N, L, r) * scale),
        "per-mode grid AR(1) (GridCorrelation)":
            decode(GridCorrelation.fit(tokens.float(), grid)(torch.randn(N, L, r)) * scale),
        f"stationary r×r cross-covariance, lags ±{args.lags}":
            decode((torch.randn(N, L * r, dtype=torch.float64) @ root.T).view(N, L, r)),
        "check: random combinations of the training tokens": decode(
            torch.einsum("mn,nlr->mlr", torch.randn(N, N, dtype=torch.float64) / N**0.5, torch.nan_to_num(tokens))),
    }
    print(f"{N} training fields, grid {grid[0]}×{grid[1]}, r = {r}; negative eigenvalue mass clipped "
          f"{float(eigenvalues.clamp_max(0).abs().sum() / eigenvalues.abs().sum()):.4f}")
    for name, fields in draws.items():
        print(f"{name}: members' power above k = 1/4 over the truth's {high_wavenumber_power_ratio(fields, truth):.3f}")


if __name__ == "__main__":
    main()
