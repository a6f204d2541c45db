"""The predictive's shape: ``y = mean + sd · Z``, with the distribution of ``Z`` learnt from the
validation errors instead of assumed Gaussian.

The ensemble's closed-form variance says *where* the error is large; per pixel the error is still
heavier-tailed than a Gaussian of that variance (an image's or a brain slice's edges: most pixels
lie well inside one predicted std, a few far outside several). No spread factor makes the
Gaussian's central intervals cover right at every level then. The standardised validation
errors ``z = (y − mean)/sd`` give ``Z``'s quantiles (``fit_error_quantiles``); every interval and
score below uses them, and the pixel mean and variance stay the closed-form ones. Where the
validation and test fields are exchangeable the intervals cover their level up to sampling
noise (split-conformal prediction with a normalised score); a shift between them (other
kinds of field, warmer years) is not corrected. Shapes as in ``podiff.metrics``:
``mean``, ``var``, ``obs`` ``[..., H, W]``; ``quantiles`` a sorted 1-D sequence of ``count``
values of ``Z`` at the levels ``(i + 0.5)/count``.

>>> import torch
>>> q = fit_error_quantiles(torch.zeros(1000), torch.ones(1000), torch.linspace(-3, 3, 1000), count=4)
>>> [round(v, 2) for v in q]
[-2.25, -0.75, 0.75, 2.25]
>>> lo, hi = central_interval(torch.zeros(2), torch.full((2,), 4.0), 0.5, q)
>>> lo.tolist(), hi.tolist()
([-3.0, -3.0], [3.0, 3.0])
"""

from __future__ import annotations

import numpy as np
import torch

from . import metrics

#: Quantiles of ``Z`` kept by default: 200 (levels 0.0025 … 0.9975).
QUANTILE_COUNT = 200

ERROR_SHAPES = ("validation", "gaussian")


def check_error_quantiles(quantiles, name: str = "error_quantiles") -> torch.Tensor:
    """``quantiles`` as a float64 tensor, checked: at least two finite values, non-decreasing."""
    try:
        q = torch.as_tensor([float(v) for v in quantiles], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers; got {quantiles!r}") from None
    if q.numel() < 2 or not bool(torch.isfinite(q).all()) or bool((q.diff() < 0).any()):
        shown = q.tolist() if q.numel() <= 6 else q[:3].tolist() + ["…"] + q[-3:].tolist()
        raise ValueError(f"{name} must hold at least two finite, non-decreasing values; got {shown}")
    return q


def fit_error_quantiles(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, count: int | None = None,
                        mask: torch.Tensor | None = None) -> list[float]:
    """Quantiles at the levels ``(i + 0.5)/count`` of the standardised errors
    ``(obs − mean)/sqrt(var)`` over the valid pixels with ``var > 0``; ``count`` None:
    ``QUANTILE_COUNT``, or as many as there are such pixels if fewer."""
    if count is not None and (int(count) != count or count < 2):
        raise ValueError(f"count must be None or an integer >= 2; got {count!r}")
    if bool((var < 0).any()):
        raise ValueError("var must be non-negative")
    valid = metrics._valid(obs, mask, mean, var) & (var > 0)
    z = ((obs.double() - mean.double()) / var.double().sqrt().clamp_min(1e-300))[valid].cpu()
    count = min(QUANTILE_COUNT, z.numel()) if count is None else count
    if z.numel() < max(count, 2):
        raise ValueError(f"obs has {z.numel()} valid pixels with var > 0; fitting {count} quantiles needs at least "
                         f"{max(count, 2)}")
    return np.quantile(z.numpy(), _levels(count)).tolist()


def _levels(count: int) -> np.ndarray:
    """The probability levels ``(i + 0.5)/count`` the quantiles are kept at."""
    return (np.arange(count) + 0.5) / count


def quantile(quantiles, level: float) -> float:
    """``Z``'s quantile at ``level`` in (0, 1), linear between the kept levels (the end values
    beyond them)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    q = check_error_quantiles(quantiles).numpy()
    return float(np.interp(level, _levels(q.size), q))


def central_interval(mean, var, level: float, quantiles=None):
    """``(lower, upper)`` tensors of the central ``level`` interval of ``mean + sd · Z``;
    ``mean`` and ``var`` tensors or arrays (a prediction file's); ``quantiles`` None or empty
    (a prediction file's ``error_quantiles`` without a shape): the Gaussian's,
    ``mean ∓ Φ⁻¹((1 + level)/2) · sd``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    mean, var = torch.as_tensor(mean), torch.as_tensor(var)
    if bool((var < 0).any()):
        raise ValueError("var must be non-negative")
    sd = var.sqrt()
    if quantiles is None or len(quantiles) == 0:
        from scipy.stats import norm

        half = float(norm.ppf((1 + level) / 2))
        return mean - half * sd, mean + half * sd
    return mean + quantile(quantiles, (1 - level) / 2) * sd, mean + quantile(quantiles, (1 + level) / 2) * sd


def coverage(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, quantiles, levels=metrics.LEVELS,
             mask: torch.Tensor | None = None) -> dict:
    """Fraction of valid pixels inside each central interval of ``mean + sd · Z``."""
    valid = metrics._valid(obs, mask, mean, var)
    out = {}
    for level in levels:
        lo, hi = central_interval(mean.double(), var.double(), level, quantiles)
        inside = ((obs.double() >= lo) & (obs.double() <= hi)).double()
        out[float(level)] = metrics._mean(inside, valid)
    return out


def crps(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, quantiles, mask: torch.Tensor | None = None,
         reduce: bool = True):
    """CRPS of ``mean + sd · Z``, ``Z`` the equally weighted atoms ``quantiles``:
    ``sd · (E|Z − t| − E|Z − Z'|/2)``, ``t = (obs − mean)/sd`` (``|obs − mean|`` where ``sd = 0``)."""
    if bool((var < 0).any()):
        raise ValueError("var must be non-negative")
    q = check_error_quantiles(quantiles).to(mean.device)
    n = q.numel()
    sums = torch.cat([q.new_zeros(1), q.cumsum(0)])
    half_spread = float(metrics.half_mean_difference(q))
    err, sd = obs.double() - mean.double(), var.double().sqrt()
    t = err / sd.clamp_min(1e-300)
    below = torch.searchsorted(q, t.contiguous())  # atoms under t
    mean_abs = (t * below - sums[below] + (sums[-1] - sums[below]) - t * (n - below)) / n
    score = torch.where(sd > 0, sd * (mean_abs - half_spread), err.abs())
    valid = metrics._valid(obs, mask, mean, var)
    if not reduce:
        return torch.where(valid.expand_as(score), score, float("nan"))
    return metrics._mean(score, valid)


__all__ = ["ERROR_SHAPES", "QUANTILE_COUNT", "central_interval", "check_error_quantiles", "coverage", "crps",
           "fit_error_quantiles", "quantile"]
