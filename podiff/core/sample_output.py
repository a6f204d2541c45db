"""``SampleOutput``: what every model's ``sample`` returns (the pipeline and the baselines), and
``Deterministic``: ``sample`` for a point predictor (the regressions, the baselines)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampleOutput:
    """``mean`` and ``variance`` ``[B, C, H, W]`` (data units; NaN on masked pixels);
    ``samples`` ``[M, B, C, H, W]`` when requested; ``tokens`` ``[M, B, L, r]`` likewise."""

    mean: torch.Tensor
    variance: torch.Tensor
    samples: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def scale_spread(self, k: float) -> None:
        """The ensemble with its spread times ``k``, in place: the variance times ``k²``, each
        member's deviation from the mean times ``k`` (a calibrated spread)."""
        self.variance = self.variance * k**2
        if self.samples is not None:
            self.samples = self.mean + k * (self.samples - self.mean)


class Deterministic:
    """``sample`` for a point predictor: the prediction with zero variance."""

    def sample(self, lr: torch.Tensor, num_samples: int = 1, steps=None, seed=None, return_samples=False,
               **_) -> SampleOutput:
        mean = self.predict(lr)
        var = torch.where(torch.isnan(mean), mean, torch.zeros_like(mean))
        samples = mean[None].expand(num_samples, *mean.shape) if return_samples else None
        return SampleOutput(mean, var, samples)


__all__ = ["Deterministic", "SampleOutput"]
