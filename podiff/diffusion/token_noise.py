"""Diffusion noise correlated across the patch grid as the training tokens are.

A patch's POD coefficients are not independent of its neighbours': a smooth field's mean and
gradient modes carry over a patch edge (the SST residual's lag-one correlations are −0.6 to
0.6 per mode). With white noise the denoiser has to learn that coupling; a small ViT trained
on tens of fields does not, so its members are independent patch by patch: their spectrum is
white, with too much power at the patch scale and seams in the spread.

``GridCorrelation`` draws the noise instead from a Gaussian whose covariance matches the tokens'
own cross-patch correlation (a data-dependent prior, as in PriorGrad): per mode ``j``, a
separable first-order autoregression over the grid, ``corr(ε[a, b, j], ε[a', b', j]) =
ρ_y[j]^|a−a'| · ρ_x[j]^|b−b'|``, with unit variance, so the schedules' signal-to-noise levels
are unchanged. When the tokens are roughly Gaussian with that covariance, the best denoiser
is token by token, which even a weak one learns, and the members inherit the correlation.

The noise stays a fixed linear map ``ε = A_y Z A_xᵀ`` of standard normal ``Z`` (``A`` the
closed-form Cholesky factor of the autoregression's Toeplitz correlation), so every sampler's
update, the seeding and the antithetic mirror are unchanged, and the pixel mean and variance
are still decoded in closed form from the members.

>>> import torch
>>> noise = GridCorrelation(torch.tensor([0.5, -0.5]), torch.tensor([0.0, 0.8]), grid=(3, 4))
>>> noise(torch.randn(6, 12, 2)).shape                     # [B, L = 3·4, r]
torch.Size([6, 12, 2])
"""

from __future__ import annotations

import contextlib

import torch

#: |ρ| is kept below this: a correlation of one would make the noise degenerate.
LIMIT = 0.95


def ar1_cholesky(rho: torch.Tensor, n: int) -> torch.Tensor:
    """Lower Cholesky factors ``[r, n, n]`` of the AR(1) correlation matrices ``ρ^|i−k|``, one
    per entry of ``rho [r]``: ``A[i, 0] = ρ^i`` and ``A[i, k] = √(1−ρ²) ρ^(i−k)`` for
    ``1 ≤ k ≤ i`` (the recursion ``ε_i = ρ ε_{i−1} + √(1−ρ²) z_i`` started in its stationary law)."""
    rho = rho.double()
    i = torch.arange(n, dtype=torch.float64)
    lag = (i[:, None] - i[None, :]).clamp_min(0)
    lower = (i[:, None] >= i[None, :]).double()
    # ρ^lag with 0^0 = 1; sign(ρ)^lag · |ρ|^lag keeps negative ρ exact
    powers = torch.where(lag == 0, torch.ones(()), rho.view(-1, 1, 1) ** lag)
    scale = torch.ones(rho.shape[0], 1, n, dtype=torch.float64)
    scale[..., 1:] = (1 - rho.square()).clamp_min(0).sqrt().view(-1, 1, 1)
    return powers * lower * scale


class GridCorrelation:
    """Per-mode separable AR(1) noise on the token grid (module doc).

    Args:
        rho_y, rho_x: ``[r]`` lag-one correlations along the grid's rows and columns, in
            ``[−LIMIT, LIMIT]``.
        grid: the token grid ``(nH, nW)``; tokens are ordered row by row (``L = nH·nW``).
    """

    def __init__(self, rho_y: torch.Tensor, rho_x: torch.Tensor, grid: tuple[int, int]):
        rho_y, rho_x = torch.as_tensor(rho_y, dtype=torch.float64), torch.as_tensor(rho_x, dtype=torch.float64)
        if rho_y.dim() != 1 or rho_y.shape != rho_x.shape:
            raise ValueError(f"rho_y and rho_x must be [r] of one length; got {tuple(rho_y.shape)} and "
                             f"{tuple(rho_x.shape)}")
        for name, rho in (("rho_y", rho_y), ("rho_x", rho_x)):
            if not bool(torch.isfinite(rho).all()) or float(rho.abs().max()) > LIMIT + 1e-12:
                raise ValueError(f"{name} must be finite with |ρ| <= {LIMIT}; got {rho.tolist()}")
        self.rho_y, self.rho_x = rho_y, rho_x
        self.grid = (int(grid[0]), int(grid[1]))
        self._factors: dict = {}

    @classmethod
    def fit(cls, tokens: torch.Tensor, grid: tuple[int, int], valid: torch.Tensor | None = None) -> GridCorrelation:
        """Lag-one correlations of ``tokens [N, L, r]`` per mode along each grid axis, over the
        neighbouring pairs of valid tokens (``valid [L]`` bool, e.g. patches with an ocean pixel;
        NaN tokens are left out too), each mode centred by its mean; clipped to ``±LIMIT``. An
        axis of one token (or with no valid pair) gets ρ = 0."""
        nH, nW = int(grid[0]), int(grid[1])
        if tokens.dim() != 3 or tokens.shape[1] != nH * nW:
            raise ValueError(f"tokens must be [N, L = {nH}·{nW}, r]; got {tuple(tokens.shape)}")
        x = tokens.detach().double().cpu()
        ok = ~torch.isnan(x)
        if valid is not None:
            ok = ok & valid.cpu().view(1, -1, 1)
        mean = torch.where(ok, x, 0.0).sum((0, 1)) / ok.sum((0, 1)).clamp_min(1)
        x = torch.where(ok, x - mean, 0.0).view(-1, nH, nW, x.shape[-1])
        ok = ok.view(-1, nH, nW, x.shape[-1])

        def lag_one(dim: int) -> torch.Tensor:
            n = x.shape[dim]
            if n < 2:
                return torch.zeros(x.shape[-1], dtype=torch.float64)
            a, b = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)
            pair = ok.narrow(dim, 0, n - 1) & ok.narrow(dim, 1, n - 1)
            a, b = torch.where(pair, a, 0.0), torch.where(pair, b, 0.0)
            num = (a * b).sum((0, 1, 2))
            den = (a.square().sum((0, 1, 2)) * b.square().sum((0, 1, 2))).sqrt()
            return torch.where(den > 0, num / den.clamp_min(1e-300), 0.0).clamp(-LIMIT, LIMIT)

        return cls(lag_one(1), lag_one(2), (nH, nW))

    def _factor_pair(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._factors:
            self._factors[key] = (ar1_cholesky(self.rho_y, self.grid[0]).to(device, dtype),
                                  ar1_cholesky(self.rho_x, self.grid[1]).to(device, dtype))
        return self._factors[key]

    def __call__(self, eps: torch.Tensor) -> torch.Tensor:
        """``ε [..., L, r]`` standard normal -> the correlated noise ``[..., L, r]`` (a linear map)."""
        nH, nW = self.grid
        r = self.rho_y.shape[0]
        if eps.shape[-2:] != (nH * nW, r):
            raise ValueError(f"noise must be [..., L = {nH * nW}, r = {r}]; got {tuple(eps.shape)}")
        a_y, a_x = self._factor_pair(eps.device, eps.dtype)
        z = eps.reshape(-1, nH, nW, r)
        # noise is part of the sampler's float32 update, not of the denoiser's autocast region
        kind = eps.device.type
        with torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext():
            out = torch.einsum("jab,nbcj,jdc->nadj", a_y, z, a_x)
        return out.reshape(eps.shape)

    def on_grid(self, grid: tuple[int, int]) -> GridCorrelation:
        """The same correlations on another token grid (a shifted patch grid in training; cached)."""
        grid = (int(grid[0]), int(grid[1]))
        if grid == self.grid:
            return self
        others = self.__dict__.setdefault("_on_grid", {})
        if grid not in others:
            others[grid] = GridCorrelation(self.rho_y, self.rho_x, grid)
        return others[grid]

    def state(self) -> dict:
        """JSON-ready: ``{"rho_y": [...], "rho_x": [...], "grid": [nH, nW]}`` (``from_state``)."""
        return {"rho_y": self.rho_y.tolist(), "rho_x": self.rho_x.tolist(), "grid": list(self.grid)}

    @classmethod
    def from_state(cls, state: dict) -> GridCorrelation:
        return cls(torch.tensor(state["rho_y"]), torch.tensor(state["rho_x"]), tuple(state["grid"]))

    def __repr__(self) -> str:
        return (f"GridCorrelation(grid={self.grid}, |ρ_y| ≤ {float(self.rho_y.abs().max()):.2f}, "
                f"|ρ_x| ≤ {float(self.rho_x.abs().max()):.2f})")


__all__ = ["GridCorrelation", "LIMIT", "ar1_cholesky"]
