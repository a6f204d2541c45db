"""``SampleOutput``: what every model's ``sample`` returns (the pipeline and the baselines)."""

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


__all__ = ["SampleOutput"]
