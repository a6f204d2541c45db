"""What every sampler's step starts from (``StepQuantities``) and the ``Sampler`` it implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepQuantities:
    """One step from time ``t`` to ``s``: the current ``sample`` ``x_t``, the denoiser's ``x0`` and
    ``eps`` (``x̂_0``, ``ε̂``), the log-SNRs ``lam_t``, ``lam_s``, ``log ᾱ`` at both times
    (``log_ab_t``, ``log_ab_s``), ``alpha_s`` (``α_s``), ``sigma2_t``, ``sigma2_s`` (``σ²``), and
    ``final``: the step lands on clean data (``s = 0``)."""

    sample: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    lam_t: torch.Tensor
    lam_s: torch.Tensor
    log_ab_t: torch.Tensor
    log_ab_s: torch.Tensor
    alpha_s: torch.Tensor
    sigma2_t: torch.Tensor
    sigma2_s: torch.Tensor
    final: bool


class Sampler:
    """A sampler's update rule. ``step(q, noise)`` returns ``x_s`` (``noise(shape, dtype)`` draws
    standard normal noise); ``stochastic``: whether a step adds noise (decided by the sampler, not
    by reading a value off the device); ``reset()`` starts a fresh chain (a multistep sampler's
    memory of the previous step)."""

    multistep = False

    def __init__(self, eta: float = 0.0):
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:
        return False

    def reset(self) -> None:
        pass

    def step(self, q: StepQuantities, noise) -> torch.Tensor:
        raise NotImplementedError


__all__ = ["Sampler", "StepQuantities"]
