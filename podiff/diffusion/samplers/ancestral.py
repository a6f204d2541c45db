"""Ancestral sampling: a draw from the DDPM posterior ``q(x_s | x_t, x̂_0)``."""

from __future__ import annotations

import torch

from podiff.diffusion.samplers.base import Sampler, StepQuantities


class Ancestral(Sampler):
    @property
    def stochastic(self) -> bool:
        return True

    def step(self, q: StepQuantities, noise) -> torch.Tensor:
        # q(x_s | x_t, x0): mean = (α_{t|s} σ_s²/σ_t²) x_t + (α_s σ²_{t|s}/σ_t²) x0,
        # var = σ²_{t|s} σ_s²/σ_t², with σ²_{t|s}/σ_t² = 1 − (ᾱ_t/ᾱ_s)(1 − ᾱ_s)/(1 − ᾱ_t).
        alpha_ts = (0.5 * (q.log_ab_t - q.log_ab_s)).exp()
        frac = torch.where(q.sigma2_t > 0, q.sigma2_s / q.sigma2_t, torch.zeros_like(q.sigma2_t))
        cond_frac = 1 - (alpha_ts**2) * frac  # σ²_{t|s}/σ_t²
        prev = alpha_ts * frac * q.sample + q.alpha_s * cond_frac * q.x0
        var = cond_frac * q.sigma2_s
        return prev + var.clamp_min(0).sqrt() * noise(q.sample.shape, q.sample.dtype)


__all__ = ["Ancestral"]
