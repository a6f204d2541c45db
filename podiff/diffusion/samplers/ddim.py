"""DDIM (Song et al. 2021) with any η: ``x_s = α_s x̂_0 + √(σ_s² − v) ε̂ (+ √v z)``, ``v = η² (σ_s²/σ_t²)
(1 − ᾱ_t/ᾱ_s)``; η = 0 is deterministic."""

from __future__ import annotations

import torch

from podiff.diffusion.samplers.base import Sampler, StepQuantities


class DDIM(Sampler):
    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(self, q: StepQuantities, noise) -> torch.Tensor:
        one_minus_ratio = -torch.expm1(q.log_ab_t - q.log_ab_s)  # 1 − ᾱ_t/ᾱ_s, exact at both ends
        var = (self.eta**2) * torch.where(q.sigma2_t > 0, q.sigma2_s / q.sigma2_t, torch.zeros_like(q.sigma2_t))
        var = var * one_minus_ratio
        direction = (q.sigma2_s - var).clamp_min(0).sqrt()
        prev = q.alpha_s * q.x0 + direction * q.eps
        if self.stochastic:
            prev = prev + var.clamp_min(0).sqrt() * noise(q.sample.shape, q.sample.dtype)
        return prev


__all__ = ["DDIM"]
