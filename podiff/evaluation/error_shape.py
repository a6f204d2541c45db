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
kinds of field, warmer years) is not corrected.

The shape may depend on the predicted value (``fit_error_shape(bands=B)``: ``Z``'s quantiles
per band of the predicted mean, the bands equal-count fifths, say, of the validation means of
each channel). On the MRI demo the errors are larger for their std on the dark pixels at the
edge of the head than on bright tissue, and the test slices, the top of the head, hold more of
them than the validation slices: one shape leaves test MACE 0.058, five bands 0.017 (Mondrian
conformal prediction; bands of the predicted std do not help, the shift is in every one).

Shapes as in ``podiff.evaluation.metrics``: ``mean``, ``var``, ``obs`` ``[..., H, W]`` (``[..., C, H, W]``
with ``edges`` of more than one channel); ``quantiles`` a sorted 1-D sequence of ``count``
values of ``Z`` at the levels ``(i + 0.5)/count``, or ``B`` such sequences with ``edges``
``[C][B − 1]``, each channel's band boundaries (pixel in band ``b`` when
``edges[c][b − 1] <= mean < edges[c][b]``).

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

from podiff.evaluation import metrics

#: Quantiles of ``Z`` kept by default: 200 (levels 0.0025 … 0.9975).
QUANTILE_COUNT = 200

ERROR_SHAPES = ("validation", "gaussian")

#: Bands of the predicted mean with a shape each, by default (``fit_error_shape``).
ERROR_BANDS = 5


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


def fit_error_shape(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, bands: int = 1,
                    count: int | None = None, mask: torch.Tensor | None = None):
    """``(quantiles, edges)``: with ``bands = 1``, ``fit_error_quantiles`` and None; else the
    equal-count band boundaries of each channel's predicted ``mean`` over the pixels with
    ``var > 0`` (``edges [C][bands − 1]``, channels on dimension −3 of a 3-D or larger ``mean``)
    and ``Z``'s quantiles within each band (``bands`` lists; a band with too few pixels takes the
    quantiles of all bands)."""
    if int(bands) != bands or bands < 1:
        raise ValueError(f"bands must be an integer >= 1; got {bands!r}")
    pooled = fit_error_quantiles(mean, var, obs, count, mask)
    if bands == 1:
        return pooled, None
    valid = metrics._valid(obs, mask, mean, var) & (var > 0)
    valid = valid.expand_as(mean)
    channels = mean.shape[-3] if mean.dim() >= 3 else 1
    def per_channel(t):
        return t.movedim(-3, 0).reshape(channels, -1) if mean.dim() >= 3 else t.reshape(1, -1)
    means, ok = per_channel(mean.double()), per_channel(valid)
    steps = np.linspace(0, 1, int(bands) + 1)[1:-1]
    edges = [np.quantile(means[c][ok[c]].cpu().numpy(), steps).tolist() if bool(ok[c].any()) else [float("inf")] *
             (int(bands) - 1) for c in range(channels)]
    band = _band_index(mean, edges)
    quantiles = []
    for b in range(int(bands)):
        inside = valid & (band == b)
        enough = int(inside.sum()) >= max(len(pooled), 2)
        quantiles.append(fit_error_quantiles(mean, var, obs, len(pooled), inside) if enough else pooled)
    return quantiles, edges


def _band_index(mean: torch.Tensor, edges) -> torch.Tensor:
    """Each pixel's band (long, ``mean``'s shape) by its channel's ``edges``."""
    e = torch.as_tensor(edges, dtype=torch.float64, device=mean.device)
    if e.dim() != 2:
        raise ValueError(f"edges must be [C][bands − 1]; got {edges!r}")
    values = mean.double()
    if e.shape[0] == 1:
        return torch.bucketize(values.contiguous(), e[0].contiguous(), right=True)
    if values.dim() < 3 or values.shape[-3] != e.shape[0]:
        raise ValueError(f"edges for {e.shape[0]} channels need mean [..., {e.shape[0]}, H, W]; "
                         f"got {tuple(values.shape)}")
    out = torch.empty(values.shape, dtype=torch.long, device=values.device)
    for c in range(e.shape[0]):
        out.select(-3, c).copy_(torch.bucketize(values.select(-3, c).contiguous(), e[c].contiguous(), right=True))
    return out


def check_error_shape(quantiles, edges=None):
    """``(quantiles, edges)`` checked: one sequence and no edges, or ``B >= 2`` sequences and
    ``edges`` ``[C][B − 1]`` of non-decreasing numbers; returns them as plain lists."""
    if edges is None:
        try:
            nested = np.ndim(quantiles) == 2
        except ValueError:  # ragged: not one sequence either
            nested = True
        if nested:
            raise ValueError("error_quantiles holds one sequence per band; error_band_edges must be given")
        return check_error_quantiles(quantiles).tolist(), None
    bands = [check_error_quantiles(q, "error_quantiles[b]").tolist() for q in quantiles]
    try:
        e = np.asarray(edges, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"error_band_edges must be [C][bands − 1] numbers; got {edges!r}") from None
    if len(bands) < 2 or e.ndim != 2 or e.shape[1] != len(bands) - 1 or np.isnan(e).any() or \
            (np.diff(e, axis=1) < 0).any():
        raise ValueError(f"error_band_edges must be [C][{len(bands) - 1}] non-decreasing numbers for {len(bands)} "
                         f"bands of error_quantiles; got shape {e.shape}")
    return bands, e.tolist()


def _banded(fn, mean, edges, quantiles):
    """``fn(quantiles_b)`` evaluated for every band and each pixel's band picked (a tuple or a
    tensor of ``mean``'s broadcast shape)."""
    band = _band_index(mean, edges)
    picked = None
    for b, q in enumerate(quantiles):
        value = fn(q)
        if picked is None:
            picked = value
        elif isinstance(value, tuple):
            picked = tuple(torch.where(band == b, v, p) for v, p in zip(value, picked, strict=False))
        else:
            picked = torch.where(band == b, value, picked)
    return picked


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


def central_interval(mean, var, level: float, quantiles=None, edges=None):
    """``(lower, upper)`` tensors of the central ``level`` interval of ``mean + sd · Z``;
    ``mean`` and ``var`` tensors or arrays (a prediction file's); ``quantiles`` None or empty
    (a prediction file's ``error_quantiles`` without a shape): the Gaussian's,
    ``mean ∓ Φ⁻¹((1 + level)/2) · sd``; with ``edges`` (``error_band_edges``), one shape per band."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    mean, var = torch.as_tensor(mean), torch.as_tensor(var)
    if edges is not None and quantiles is not None and len(quantiles):
        quantiles, edges = check_error_shape(quantiles, edges)
        return _banded(lambda q: central_interval(mean, var, level, q), mean, edges, quantiles)
    if bool((var < 0).any()):
        raise ValueError("var must be non-negative")
    sd = var.sqrt()
    if quantiles is None or len(quantiles) == 0:
        from scipy.stats import norm

        half = float(norm.ppf((1 + level) / 2))
        return mean - half * sd, mean + half * sd
    return mean + quantile(quantiles, (1 - level) / 2) * sd, mean + quantile(quantiles, (1 + level) / 2) * sd


def coverage(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, quantiles, levels=metrics.LEVELS,
             mask: torch.Tensor | None = None, edges=None) -> dict:
    """Fraction of valid pixels inside each central interval of ``mean + sd · Z`` (``edges``: one
    shape per band); pixels with ``var = 0`` and ``obs = mean`` (certain pixels,
    ``podiff.data.bounds``) are left out."""
    valid = metrics._uncertain(metrics._valid(obs, mask, mean, var), (var == 0) & (obs == mean))
    out = {}
    for level in levels:
        lo, hi = central_interval(mean.double(), var.double(), level, quantiles, edges)
        inside = ((obs.double() >= lo) & (obs.double() <= hi)).double()
        out[float(level)] = metrics._mean(inside, valid)
    return out


def crps(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, quantiles, mask: torch.Tensor | None = None,
         reduce: bool = True, edges=None):
    """CRPS of ``mean + sd · Z``, ``Z`` the equally weighted atoms ``quantiles``:
    ``sd · (E|Z − t| − E|Z − Z'|/2)``, ``t = (obs − mean)/sd`` (``|obs − mean|`` where ``sd = 0``);
    ``edges``: one shape per band."""
    if bool((var < 0).any()):
        raise ValueError("var must be non-negative")
    if edges is not None:
        quantiles, edges = check_error_shape(quantiles, edges)
        score = _banded(lambda q: crps(mean, var, obs, q, reduce=False), mean, edges, quantiles)
        valid = metrics._valid(obs, mask, mean, var)
        if not reduce:
            return torch.where(valid.expand_as(score), score, float("nan"))
        return metrics._mean(score, valid)
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


__all__ = ["ERROR_BANDS", "ERROR_SHAPES", "QUANTILE_COUNT", "central_interval", "check_error_quantiles",
           "check_error_shape",
           "coverage", "crps", "fit_error_quantiles", "fit_error_shape", "quantile"]
