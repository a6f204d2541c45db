"""Deterministic and probabilistic scores, mask-aware (``mask``: bool, True = valid).

Shapes: ``pred``, ``target``, ``obs`` ``[..., H, W]``; ensembles ``members [M, ...]``; the
mask broadcasts against them. NaN in a target is treated as masked too. Every reduction
is over the valid pixels; the ``crps_*`` functions with ``reduce=False`` return the
per-pixel map (NaN where masked).

>>> rmse(torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8))
1.0
"""

from __future__ import annotations

import math

import numpy as np
import torch

LEVELS = (0.5, 0.7, 0.9, 0.95)


def _valid(target: torch.Tensor, mask: torch.Tensor | None, *others: torch.Tensor) -> torch.Tensor:
    valid = ~torch.isnan(target)
    for other in others:
        valid = valid & ~torch.isnan(other)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = valid); got {mask.dtype}")
        valid = valid & mask.to(target.device)
    if not bool(valid.any()):
        raise ValueError("no valid pixels to score (everything is masked or NaN)")
    return valid


def _uncertain(valid: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``valid`` without the pixels whose predictive is a point mass at the observation (``exact``):
    every interval covers them, so they say nothing of calibration (a point mass elsewhere still
    counts, as a miss). Such pixels come from ``podiff.data.bounds``."""
    uncertain = valid & ~exact
    if not bool(uncertain.any()):
        raise ValueError("no pixel with an uncertain prediction to score coverage on (every valid pixel's "
                         "predictive is a point mass at its observation)")
    return uncertain


def _mean(values: torch.Tensor, valid: torch.Tensor) -> float:
    return float(values.double()[valid.expand_as(values)].mean())


def rmse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Root-mean-square error over valid pixels."""
    valid = _valid(target, mask, pred)
    return math.sqrt(_mean((pred - target) ** 2, valid))


def mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean absolute error over valid pixels."""
    valid = _valid(target, mask, pred)
    return _mean((pred - target).abs(), valid)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float, mask: torch.Tensor | None = None) -> float:
    """``10 log10(data_range² / MSE)`` in dB (pooled MSE over all valid pixels)."""
    if data_range <= 0:
        raise ValueError(f"data_range must be positive; got {data_range}")
    valid = _valid(target, mask, pred)
    mse = _mean((pred - target) ** 2, valid)
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float, mask: torch.Tensor | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004: 7×7 uniform window, K1 = 0.01, K2 = 0.03,
    sample covariances), averaged over images and channels; masked pixels are filled with the
    target's valid mean and windows touching them are left out of the mean."""
    import torch.nn.functional as F

    if data_range <= 0:
        raise ValueError(f"data_range must be positive; got {data_range}")
    valid = _valid(target, mask, pred)
    p = pred.double().reshape(-1, 1, *pred.shape[-2:])
    t = target.double().reshape(-1, 1, *target.shape[-2:])
    v = valid.expand_as(target).reshape(-1, 1, *target.shape[-2:]).double()
    fill = (torch.where(v > 0, t, 0.0).sum() / v.sum())
    p, t = torch.where(v > 0, p, fill), torch.where(v > 0, t, fill)
    win, n = 7, 49
    if min(p.shape[-2:]) < win:
        raise ValueError(f"images must be at least {win}×{win} for SSIM; got {tuple(p.shape[-2:])}")
    pool = lambda z: F.avg_pool2d(z, win, stride=1)  # noqa: E731
    mp, mt = pool(p), pool(t)
    cov_norm = n / (n - 1)
    vp, vt = cov_norm * (pool(p * p) - mp**2), cov_norm * (pool(t * t) - mt**2)
    cpt = cov_norm * (pool(p * t) - mp * mt)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mp * mt + c1) * (2 * cpt + c2)) / ((mp**2 + mt**2 + c1) * (vp + vt + c2))
    full = pool(v) > 1 - 1e-9  # windows with every pixel valid
    if not bool(full.any()):
        raise ValueError("no 7×7 window is fully valid; SSIM is undefined here")
    return float(s[full].mean())


def half_mean_difference(members: torch.Tensor, fair: bool = False) -> torch.Tensor:
    """``½ E|X − X'|`` of the ensemble ``members [M, ...]`` per point, from the sorted members:
    ``Σ_ij |x_i − x_j| = 2 Σ_i (2i − M − 1) x_(i)``, over ``M²`` pairs (``fair``: ``M(M − 1)``)."""
    M = members.shape[0]
    i = torch.arange(1, M + 1, dtype=members.dtype, device=members.device).view(-1, *([1] * (members.dim() - 1)))
    return ((2 * i - M - 1) * members.sort(0).values).sum(0) / (M * (M - 1) if fair else M * M)


def crps_ensemble(members: torch.Tensor, obs: torch.Tensor, fair: bool = False, mask: torch.Tensor | None = None,
                  reduce: bool = True):
    """CRPS of an ensemble ``members [M, ...]`` against ``obs [...]``.

    ``E|X − y| − ½ E|X − X'|``; ``fair=True`` uses ``M(M − 1)`` for the second term (unbiased
    for the underlying distribution, Ferro 2014). Computed from sorted members in O(M log M).
    """
    if members.shape[1:] != obs.shape:
        raise ValueError(f"members must be [M, *obs.shape]; got {tuple(members.shape)} and obs {tuple(obs.shape)}")
    M = members.shape[0]
    if M < 2 and fair:
        raise ValueError("the fair CRPS needs at least two members")
    x = members.double()
    skill = (x - obs.double()).abs().mean(0)
    crps = skill - half_mean_difference(x, fair)
    valid = _valid(obs, mask, members[0])
    if not reduce:
        return torch.where(valid.expand_as(crps), crps, float("nan"))
    return _mean(crps, valid)


def _normal_crps(err: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """Elementwise CRPS of ``N(0, sd²)`` at ``err``: ``σ [z(2Φ(z) − 1) + 2φ(z) − 1/√π]``, ``z = err/σ``
    (``|err|`` where ``σ = 0``)."""
    z = err / sd.clamp_min(1e-300)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    crps = sd * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    return torch.where(sd > 0, crps, err.abs())


def crps_gaussian(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor | None = None,
                  reduce: bool = True):
    """Closed-form CRPS of ``N(mean, var)``: ``σ [z(2Φ(z) − 1) + 2φ(z) − 1/√π]``, ``z = (y − μ)/σ``."""
    if (var < 0).any():
        raise ValueError("var must be non-negative")
    crps = _normal_crps(obs.double() - mean.double(), var.double().sqrt())
    valid = _valid(obs, mask, mean, var)
    if not reduce:
        return torch.where(valid.expand_as(crps), crps, float("nan"))
    return _mean(crps, valid)


SPREAD_METHODS = ("crps", "moments")


def check_spread_limits(limits, name: str = "limits") -> tuple[float, float]:
    """``(low, high)`` of ``limits``, checked: ``0 < low <= high`` (``name`` goes into the error)."""
    try:
        lo, hi = (float(v) for v in limits)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (low, high); got {limits!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must satisfy 0 < low <= high; got {limits!r}")
    return lo, hi


def calibrated_spread(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, method: str = "crps",
                      limits=(0.5, 2.0), mask: torch.Tensor | None = None) -> float:
    """The factor ``k`` for the predictive standard deviation, ``N(mean, k² var)``, fitted to
    ``obs`` over the valid pixels and clipped to ``limits``.

    ``"crps"``: the ``k`` minimising the mean ``crps_gaussian`` (a proper score, so robust where
    errors are heavy-tailed: a few sharp edges on a flat background). ``"moments"``:
    ``k² = mean((obs − mean)²) / mean(var)``, moment matching (temperature scaling), which those
    few large errors dominate. Example: ``k = calibrated_spread(m, v, y); v_cal = k**2 * v``.
    """
    if method not in SPREAD_METHODS:
        raise ValueError(f"method must be one of {SPREAD_METHODS}; got {method!r}")
    lo, hi = check_spread_limits(limits)
    valid = _valid(obs, mask, mean, var)
    err = (obs.double() - mean.double())[valid].cpu()
    v = var.double().expand_as(valid)[valid].cpu()
    if err.numel() == 0:
        raise ValueError("obs has no valid pixel to calibrate on")
    if method == "moments" or not bool((v > 0).any()):
        k = float((err.square().mean() / v.mean()).sqrt()) if v.mean() > 0 else 1.0
    else:
        sd = v.sqrt()
        # each pixel's CRPS is convex in k (σ·f(e/σ), f convex), so the mean is unimodal in log k
        k = _minimising_factor(lambda k: float(_normal_crps(err, k * sd).mean()), lo, hi)
    return float(min(max(k, lo), hi))


def _minimising_factor(score, lo: float, hi: float) -> float:
    """The ``k`` in ``[lo, hi]`` minimising a ``score(k)`` unimodal in ``log k`` (bounded search;
    the bounds exactly when the minimum lies on one)."""
    from scipy.optimize import minimize_scalar

    in_log = lambda log_k: score(math.exp(log_k))  # noqa: E731
    inner = minimize_scalar(in_log, bounds=(math.log(lo), math.log(hi)), method="bounded", options={"xatol": 1e-5}).x
    return math.exp(min((inner, math.log(lo), math.log(hi)), key=in_log))


def members_spread(members: torch.Tensor, obs: torch.Tensor, limits=(0.5, 2.0),
                   mask: torch.Tensor | None = None) -> float:
    """The factor ``k`` for the members' deviations from their mean, ``mean + k (x_i − mean)``,
    minimising their mean fair CRPS (``crps_ensemble(..., fair=True)``) against ``obs`` over the
    valid pixels, clipped to ``limits``. ``members [M, ...]``, ``obs [...]``. Each pixel's score
    is convex in ``k``: ``E|mean + k d − y|`` is, and the spread term is ``k`` times that of the
    deviations ``d``. Example: ``k = members_spread(x, y); x_cal = x.mean(0) + k * (x - x.mean(0))``.
    """
    if members.shape[1:] != obs.shape:
        raise ValueError(f"members must be [M, *obs.shape]; got {tuple(members.shape)} and obs {tuple(obs.shape)}")
    M = members.shape[0]
    if M < 2:
        raise ValueError(f"members_spread needs at least two members; got {M}")
    lo, hi = check_spread_limits(limits)
    valid = _valid(obs, mask, members[0]).expand_as(obs)
    x = members.double()
    centre = x.mean(0)
    dev = (x - centre)[:, valid]
    err = (obs.double() - centre)[valid]
    spread = half_mean_difference(dev, fair=True).mean()
    return float(min(max(_minimising_factor(
        lambda k: float((k * dev - err).abs().mean(0).mean()) - k * float(spread), lo, hi), lo), hi))


def _order_statistic(sorted_members: torch.Tensor, position: float) -> torch.Tensor:
    """Linear interpolation between order statistics at a 0-based fractional ``position``."""
    M = sorted_members.shape[0]
    position = min(max(position, 0.0), M - 1.0)
    lo = int(math.floor(position))
    hi = min(lo + 1, M - 1)
    frac = position - lo
    return sorted_members[lo] * (1 - frac) + sorted_members[hi] * frac


def coverage(members: torch.Tensor, obs: torch.Tensor, levels=LEVELS, mask: torch.Tensor | None = None) -> dict:
    """Fraction of valid pixels whose observation lies in the ensemble's central interval.

    The interval of ``level`` runs between the ensemble quantiles ``(1 ∓ level)/2`` taken at
    Weibull plotting positions ``q (M + 1)`` (order statistic ``i`` sits at ``q = i/(M + 1)``),
    so an ensemble exchangeable with the observation covers ``level`` on average — the usual
    ``M − 1`` positions would under-cover by the factor ``(M − 1)/(M + 1)``. Intervals cannot
    reach past the extreme members: coverage is at most ``(M − 1)/(M + 1)``.
    """
    if members.shape[1:] != obs.shape:
        raise ValueError(f"members must be [M, *obs.shape]; got {tuple(members.shape)} and obs {tuple(obs.shape)}")
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"levels must be in (0, 1); got {level}")
    valid = _valid(obs, mask, members[0])
    xs, y = members.double().sort(0).values, obs.double()
    valid = _uncertain(valid, (xs[0] == y) & (xs[-1] == y))
    M = xs.shape[0]
    out = {}
    for level in levels:
        lo = _order_statistic(xs, (1 - level) / 2 * (M + 1) - 1)
        hi = _order_statistic(xs, (1 + level) / 2 * (M + 1) - 1)
        inside = ((y >= lo) & (y <= hi)).double()
        out[float(level)] = _mean(inside, valid)
    return out


def coverage_gaussian(mean: torch.Tensor, var: torch.Tensor, obs: torch.Tensor, levels=LEVELS,
                      mask: torch.Tensor | None = None) -> dict:
    """Coverage of the central intervals of ``N(mean, var)`` (the analytic-variance counterpart);
    pixels with ``var = 0`` and ``obs = mean`` (certain pixels, ``podiff.data.bounds``) are left out."""
    valid = _uncertain(_valid(obs, mask, mean, var), (var == 0) & (obs == mean))
    z = ((obs.double() - mean.double()) / var.double().sqrt().clamp_min(1e-300)).abs()
    from scipy.stats import norm

    return {float(level): _mean((z <= float(norm.ppf((1 + level) / 2))).double(), valid) for level in levels}


def mace(coverage_dict: dict) -> float:
    """Mean absolute calibration error: mean of ``|coverage − level|`` over the levels."""
    if not coverage_dict:
        raise ValueError("coverage_dict is empty")
    return float(np.mean([abs(v - float(k)) for k, v in coverage_dict.items()]))


def spread_skill_ratio(members: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``sqrt(mean ensemble variance · (M + 1)/M) / RMSE(ensemble mean)``; 1 for a calibrated ensemble."""
    M = members.shape[0]
    if M < 2:
        raise ValueError("spread needs at least two members")
    valid = _valid(obs, mask, members[0])
    spread = _mean(members.double().var(0), valid) * (M + 1) / M
    skill = rmse(members.double().mean(0), obs.double(), valid)
    return math.sqrt(spread) / skill if skill > 0 else float("inf")


def grid_imprint(field: torch.Tensor, period: int) -> float:
    """How much a positive map ``field [..., H, W]`` (a predicted-std map) varies with the position
    within a ``period``-pixel grid cell: the map is folded onto one ``period × period`` cell (the
    mean over all cells and leading dimensions, NaN left out), and the result is that pattern's
    standard deviation over its mean. About 0 for a map with no grid in it (the noise of the
    fold: compare another period); a patch-wise spread that rises toward patch edges gives tens
    of per cent. The cells start at pixel 0 (patches tile from the top-left corner).

    >>> bumps = (torch.arange(16.) % 4 == 0).double().expand(16, 16) + 1   # every 4th column higher
    >>> round(grid_imprint(bumps, 4), 3), round(grid_imprint(bumps, 3), 3)   # the grid, and another period
    (0.346, 0.074)
    """
    if field.dim() < 2:
        raise ValueError(f"field must be [..., H, W]; got shape {tuple(field.shape)}")
    period = int(period)
    H, W = field.shape[-2:]
    if not 2 <= period <= min(H, W):
        raise ValueError(f"period must be in [2, {min(H, W)}] pixels; got {period}")
    h, w = H - H % period, W - W % period
    x = field.double()[..., :h, :w].reshape(-1, h // period, period, w // period, period)
    pattern = torch.nanmean(x.permute(2, 4, 0, 1, 3).reshape(period, period, -1), -1)
    if bool(torch.isnan(pattern).any()):
        raise ValueError(f"some position of the {period}-pixel cell is masked in every cell")
    level = float(pattern.mean())
    if not level > 0:
        raise ValueError(f"field must be a positive map (a predicted std); its mean is {level:.3g}")
    return float(pattern.std(unbiased=False)) / level


def rank_histogram(members: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Counts ``[M + 1]`` of the observation's rank among the members (ties split at random
    positions with a fixed seed); flat for a calibrated ensemble."""
    M = members.shape[0]
    valid = _valid(obs, mask, members[0]).expand_as(obs)
    x, y = members.double()[:, valid], obs.double()[valid]
    below = (x < y).sum(0)
    ties = (x == y).sum(0)
    g = torch.Generator().manual_seed(0)
    jitter = (torch.rand(ties.shape, generator=g, dtype=torch.float64) * (ties + 1)).floor().long()
    return torch.bincount(below + jitter, minlength=M + 1)


def rank_histogram_flatness(counts: torch.Tensor) -> dict:
    """How far rank-histogram ``counts [M + 1]`` (``rank_histogram``) are from flat:
    ``reliability_index`` ``Σ_i |n_i / N − 1/(M + 1)|`` (Delle Monache et al. 2006; 0 when flat,
    up to ``2 M/(M + 1)`` with every observation in one bin) and Pearson's ``chi2`` against the
    uniform counts with its ``df = M`` (pixels are correlated, so read ``chi2 / df`` as a size,
    not as a test: a million pixels make any small slope significant).

    >>> rank_histogram_flatness(torch.tensor([10, 10, 10, 10]))["reliability_index"]
    0.0
    """
    counts = torch.as_tensor(counts).double().flatten()
    if counts.numel() < 2 or bool((counts < 0).any()) or not float(counts.sum()) > 0:
        raise ValueError(f"counts must be M + 1 >= 2 non-negative rank counts with a positive total; got "
                         f"{counts.tolist()}")
    n, bins = float(counts.sum()), counts.numel()
    expected = n / bins
    return {"reliability_index": float((counts / n - 1.0 / bins).abs().sum()),
            "chi2": float(((counts - expected).square() / expected).sum()), "df": bins - 1}


def neighbour_jump_ratio(fields: torch.Tensor, patch_size: int) -> float:
    """The mean squared difference between neighbouring pixels across the edges of a
    ``patch_size`` grid (patches tile from the top-left pixel) over that between neighbours within
    a patch, along both axes, for fields ``[..., H, W]`` (NaN pixels and the pairs they are in
    left out). A field with no patch structure gives about 1; a patch-wise field that jumps at the
    edges gives more."""
    p = int(patch_size)
    if fields.dim() < 2 or min(fields.shape[-2:]) <= p or p < 2:
        raise ValueError(f"fields must be [..., H, W] with H, W > patch_size >= 2; got shape "
                         f"{tuple(fields.shape)} and patch_size {patch_size}")
    x = fields.double()
    across = within = 0.0
    n_across = n_within = 0
    for axis in (-1, -2):
        d = x.diff(dim=axis).square()
        edge = (torch.arange(1, x.shape[axis], device=x.device) % p == 0)
        edge = edge.view(-1, 1) if axis == -2 else edge
        ok = ~torch.isnan(d)
        edge = edge.expand_as(d)
        across += float(d[ok & edge].sum())
        n_across += int((ok & edge).sum())
        within += float(d[ok & ~edge].sum())
        n_within += int((ok & ~edge).sum())
    if not n_across or not n_within or not within > 0:
        raise ValueError("fields have no valid neighbouring pairs across or within patches (or are constant "
                         "within patches)")
    return (across / n_across) / (within / n_within)


def patch_edge_ratio(members: torch.Tensor, truth: torch.Tensor, patch_size: int) -> float:
    """``neighbour_jump_ratio`` of the members ``[M, ...]`` over the truth's ``[...]``: 1 when the
    members jump across patch edges as much as the truth does; above 1, the members are blocky."""
    if members.shape[-truth.dim():] != truth.shape:
        raise ValueError(f"members must be [M, *truth.shape] or truth's shape {tuple(truth.shape)}; "
                         f"got {tuple(members.shape)}")
    nan = torch.isnan(truth)
    return neighbour_jump_ratio(torch.where(nan, float("nan"), members.double()), patch_size) / \
        neighbour_jump_ratio(truth, patch_size)


def _detrended_windowed(x: torch.Tensor, dims: int) -> tuple[torch.Tensor, float]:
    """``x [..., n]`` (``dims=1``) or ``[..., h, w]`` (``dims=2``) minus its least-squares line or
    plane, times a Hann window; returns it and the window's ``Σ w²`` (the power's normaliser).
    A field is not periodic: without this its trend's jump at the edges leaks a ``1/k²`` tail into
    every wavenumber, and a smooth field would seem to keep small scales."""
    shape = x.shape[-dims:]
    axes = [torch.linspace(-1, 1, n, dtype=x.dtype, device=x.device) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij") if dims == 2 else (axes[0],)
    design = torch.stack([torch.ones(shape, dtype=x.dtype, device=x.device), *grids], -1).reshape(-1, dims + 1)
    flat = x.reshape(*x.shape[:-dims], -1)
    coef = torch.linalg.lstsq(design, flat.reshape(-1, flat.shape[-1]).T).solution  # [dims + 1, pieces]
    residual = (flat.reshape(-1, flat.shape[-1]) - (design @ coef).T).reshape(x.shape)
    window = torch.hann_window(shape[-1], dtype=x.dtype, device=x.device)  # periodic, as scipy's
    if dims == 2:
        window = torch.hann_window(shape[0], dtype=x.dtype, device=x.device)[:, None] * window
    return residual * window, float(window.square().sum())


def power_spectrum(field: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "auto",
                   segment: int | None = None):
    """Power spectrum of fields ``[..., H, W]``, averaged over the leading dimensions; returns
    ``(wavenumber [K], power [K])``, the wavenumber in cycles per pixel (``1/n … 1/2``) and the
    power in each wavenumber bin, per pixel: the powers sum to about the variance (Parseval;
    the radial kind leaves out the corners beyond 1/2).

    Each field, line or segment has its least-squares plane or line removed and a Hann window
    applied before the FFT (a field is not periodic: its trend's edge jump would leak a ``1/k²``
    tail into every wavenumber); the power is normalised by the window's ``Σ w²`` (the axis kind
    equals ``scipy.signal.periodogram(x, window="hann", detrend="linear", scaling="density") / n``).

    ``kind``: ``"radial"`` (2-D FFT, |k| binned in steps of ``1/min(H, W)``), ``"axis"`` (1-D
    periodograms along the longer axis, one-sided, averaged over the other: a strip such as the
    SST's 16×432), or ``"auto"``: radial when the longer side is at most twice the shorter and
    nothing is masked, else axis.

    Masked (``mask`` False) and NaN pixels are left out, not filled: a filled gap's edges would
    put the mask's own spectrum into every field's. The radial kind uses only fully valid
    fields; the axis kind cuts each line into ``segment``-pixel pieces overlapping by half
    (Welch) and uses the fully valid ones (default ``segment``: the whole line when nothing is
    masked, else a quarter of it).

    >>> k, p = power_spectrum(torch.cos(torch.arange(64.) * 3.14159265 / 2).expand(8, 64), kind="axis")
    >>> float(k[p.argmax()])
    0.25
    """
    if field.dim() < 2:
        raise ValueError(f"field must be [..., H, W]; got shape {tuple(field.shape)}")
    H, W = field.shape[-2:]
    if kind not in ("auto", "radial", "axis"):
        raise ValueError(f"kind must be 'auto', 'radial' or 'axis'; got {kind!r}")
    x = field.double().reshape(-1, H, W)
    valid = ~torch.isnan(x)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = valid); got {mask.dtype}")
        valid = valid & mask.to(x.device).expand(*field.shape).reshape(-1, H, W)
    whole = bool(valid.all())
    if kind == "auto":
        kind = "radial" if max(H, W) <= 2 * min(H, W) and whole else "axis"
    if kind == "radial":
        full = valid.flatten(1).all(1)
        if not bool(full.any()):
            raise ValueError("the radial spectrum needs at least one field without masked pixels; "
                             "use kind='axis' for masked fields")
        tapered, norm = _detrended_windowed(x[full], 2)
        spec = (torch.fft.fft2(tapered).abs().square() / (norm * H * W)).mean(0)
        k = torch.sqrt(torch.fft.fftfreq(H, dtype=torch.float64)[:, None] ** 2
                       + torch.fft.fftfreq(W, dtype=torch.float64)[None, :] ** 2)
        n = min(H, W)
        bins = torch.round(k * n).long()
        K = n // 2
        inside = (bins >= 1) & (bins <= K)
        power = torch.zeros(K + 1, dtype=torch.float64).index_add_(0, bins[inside], spec[inside])
        return torch.arange(1, K + 1, dtype=torch.float64) / n, power[1:]
    if H > W:  # the longer axis last
        x, valid, H, W = x.transpose(1, 2), valid.transpose(1, 2), W, H
    n = (W if whole else max(4, W // 4)) if segment is None else int(segment)
    if not 4 <= n <= W:
        raise ValueError(f"segment must be in [4, {W}] (the longer axis); got {segment}")
    hop = max(1, n // 2)
    keep = valid.unfold(2, n, hop).all(-1)
    if not bool(keep.any()):
        raise ValueError(f"no fully valid segment of {n} pixels along the longer axis; pass a shorter segment")
    tapered, norm = _detrended_windowed(x.unfold(2, n, hop)[keep], 1)  # [pieces, n]
    spec = torch.fft.rfft(tapered, dim=-1).abs().square() / (norm * n)
    spec[:, 1:(n + 1) // 2] *= 2  # one-sided: the negative frequencies' half
    return torch.fft.rfftfreq(n, dtype=torch.float64)[1:], spec.mean(0)[1:]


def paired_spectra(members: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                   kind: str = "auto", segment: int | None = None):
    """``(wavenumber, members' power, truth's power)`` (``power_spectrum``) of ``members [M, ...]``
    (or one field ``[...]``, e.g. an ensemble mean) and ``truth [...]``, both ``[..., H, W]``, on
    the same pieces (fields or segments): those valid in the truth and the members. Computed once,
    they give ``high_k_ratio`` and ``power_in_bands``."""
    if members.shape[-truth.dim():] != truth.shape:
        raise ValueError(f"members must be [M, *truth.shape] or truth's shape {tuple(truth.shape)}; "
                         f"got {tuple(members.shape)}")
    valid = ~torch.isnan(truth) if mask is None else mask.to(truth.device) & ~torch.isnan(truth)
    k, p_members = power_spectrum(members, valid.expand_as(members), kind, segment)
    _, p_truth = power_spectrum(truth, valid, kind, segment)
    return k, p_members, p_truth


def high_k_ratio(k: torch.Tensor, p_members: torch.Tensor, p_truth: torch.Tensor) -> float:
    """The members' power over the truth's above ``k = 1/4`` cycles per pixel, from
    ``paired_spectra``."""
    high = k > 0.25
    return float(p_members[high].sum() / p_truth[high].sum())


def high_wavenumber_power_ratio(members: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                                kind: str = "auto", segment: int | None = None) -> float:
    """The members' power over the truth's in the upper half of the wavenumbers (``k > 1/4``
    cycles per pixel); ``members [M, ...]`` (or one field ``[...]``, e.g. an ensemble mean) against
    ``truth [...]``, both ``[..., H, W]``. About 1 when the members keep the small scales; an
    ensemble mean or a regression, which average them away, gives less. The same pieces (fields
    or segments, ``power_spectrum``) of both: those valid in the truth and the members."""
    return high_k_ratio(*paired_spectra(members, truth, mask, kind, segment))


#: Log-spaced wavenumber bands of ``band_power_ratios``.
POWER_BANDS = 4


def band_power_ratios(members: torch.Tensor, truth: torch.Tensor, bands: int = POWER_BANDS,
                      mask: torch.Tensor | None = None, kind: str = "auto", segment: int | None = None) -> list[dict]:
    """The members' power over the truth's in ``bands`` wavenumber bands, log-spaced from the
    lowest resolved wavenumber to ``1/2`` cycles per pixel (``power_in_bands`` of
    ``paired_spectra``). ``members [M, ...]`` (or one field) against ``truth [...]``, the pieces of
    ``power_spectrum`` valid in both. Realistic members give about 1 in every band; an ensemble
    mean falls off at small scales, noisy members rise there."""
    return power_in_bands(*paired_spectra(members, truth, mask, kind, segment), bands)


def power_in_bands(k: torch.Tensor, p_members: torch.Tensor, p_truth: torch.Tensor,
                   bands: int = POWER_BANDS) -> list[dict]:
    """``[{"k_low", "k_high", "ratio"}]`` of ``paired_spectra``: the members' power over the
    truth's in ``bands`` log-spaced bands, large scales first (a band holds the wavenumbers
    ``k_low <= k < k_high``, the last one ``1/2`` too)."""
    if int(bands) != bands or bands < 1:
        raise ValueError(f"bands must be an integer >= 1; got {bands!r}")
    edges = torch.logspace(math.log10(float(k[0])), math.log10(0.5), int(bands) + 1, dtype=torch.float64)
    which = (torch.searchsorted(edges, k, right=True) - 1).clamp(0, int(bands) - 1)
    out = []
    for b in range(int(bands)):
        inside = which == b
        if not bool(inside.any()):
            raise ValueError(f"{bands} bands leave the band {float(edges[b]):.4g}–{float(edges[b + 1]):.4g} "
                             f"without a wavenumber of these {len(k)}; use fewer bands")
        out.append({"k_low": float(edges[b]), "k_high": float(edges[b + 1]),
                    "ratio": float(p_members[inside].sum() / p_truth[inside].sum())})
    return out
