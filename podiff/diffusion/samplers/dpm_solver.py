"""DPM-Solver++ (2M) (Lu et al. 2022), the multistep second-order solver in data prediction, in
midpoint form as diffusers' ``DPMSolverMultistepScheduler``: ``"dpmsolver++"`` (deterministic)
and ``"sde-dpmsolver++"`` (its stochastic variant); first order on the first step and on the
step that lands on clean data (see ``podiff.diffusion.sampling``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from podiff.diffusion.samplers.base import Sampler, StepQuantities


class DPMSolverPP(Sampler):
    multistep = True

    def __init__(self, eta: float = 0.0):
        super().__init__(eta)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x̂_0, h) of the last step

    def reset(self) -> None:
        self.previous = None

    def data_prediction(self, q: StepQuantities):
        """``(h, log σ_s/σ_t, D)``: the half log-SNR step, the σ ratio and the second-order ``x̂_0``."""
        h = 0.5 * (q.lam_s - q.lam_t)  # +inf on the step from zero SNR: e^{−h} = 0, and the next r = ∞ gives D = x̂_0
        log_sigma_ratio = 0.5 * (F.logsigmoid(-q.lam_s) - F.logsigmoid(-q.lam_t))  # log σ_s/σ_t, −inf at σ_s = 0
        D = q.x0
        if self.previous is not None and not q.final:
            x0_prev, h_prev = self.previous
            D = q.x0 + 0.5 * (h / h_prev) * (q.x0 - x0_prev)  # D0 + D1/2, D1 = (x̂_0 − x̂_0')/r
        self.previous = (q.x0, h)
        return h, log_sigma_ratio, D

    def step(self, q: StepQuantities, noise) -> torch.Tensor:
        h, log_sigma_ratio, D = self.data_prediction(q)
        return log_sigma_ratio.exp() * q.sample + q.alpha_s * (-torch.expm1(-h)) * D


class SDEDPMSolverPP(DPMSolverPP):
    @property
    def stochastic(self) -> bool:
        return True

    def step(self, q: StepQuantities, noise) -> torch.Tensor:
        h, log_sigma_ratio, D = self.data_prediction(q)
        one_minus = -torch.expm1(-2 * h)  # 1 − e^{−2h}
        prev = (log_sigma_ratio - h).exp() * q.sample + q.alpha_s * one_minus * D
        return prev + q.sigma2_s.sqrt() * one_minus.clamp_min(0).sqrt() * noise(q.sample.shape, q.sample.dtype)


__all__ = ["DPMSolverPP", "SDEDPMSolverPP"]
