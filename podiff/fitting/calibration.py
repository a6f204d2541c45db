"""Calibration: the spread factor and the predictive's shape of a trained ``PODiffPipeline``,
from held-out fields (``calibrate_spread``); the result is the model's ``calibration`` state
(``model.state.Calibration``), saved with it."""

from __future__ import annotations

import torch

from podiff.evaluation import error_shape, metrics
from podiff.model.state import Calibration


def calibrate_spread(pipe, lr_val: torch.Tensor, hr_val: torch.Tensor, num_samples: int | None = None,
                     seed: int | None = None, limits=(0.5, 2.0), method: str = "members",
                     mode_limits=(0.25, 4.0), shape: str = "validation",
                     bands: int = error_shape.ERROR_BANDS, return_ensemble: bool = False,
                     distributed: bool | None = None):
    """Sets ``pipe.calibration.spread`` from the validation fields ``[N, C, H, W]`` and returns it,
    clipped to ``limits``: ``method`` ``"members"`` (the default) is the factor for the members'
    deviations that minimises their fair CRPS (``metrics.members_spread``: the members are what a
    user draws); ``"crps"`` minimises the validation CRPS of ``N(m, k² σ²)`` and ``"moments"``
    matches the mean squared error (``metrics.calibrated_spread``). ``"modes"`` first sets
    ``calibration.mode_spread``, one factor per POD mode minimising the CRPS of that mode's
    validation tokens (clipped to ``mode_limits``; where the model's spread is wrong by a different
    amount in each mode), then ``k`` by CRPS on top. ``shape`` ``"validation"`` (the default) also
    sets ``calibration.error_quantiles``, the quantiles of the validation errors over the
    calibrated std (``podiff.evaluation.error_shape``: the intervals and CRPS of a heavier-tailed
    predictive than the Gaussian), one shape for each of ``bands`` equal-count bands of the
    predicted mean (``calibration.error_band_edges``; ``bands=1``: one shape); ``"gaussian"``
    clears them.
    The ensemble (``num_samples`` members; None: 16, or 2 on each of ``config.member_grids`` if
    more) is drawn with ``spread = 1`` (and no per-mode factors). ``return_ensemble``:
    returns ``(k, ensemble)``, the validation ensemble (``SampleOutput`` with its members) as the
    calibrated model draws it (deviations from the mean times ``k``), so that a caller scores the
    validation fields without sampling them again. ``distributed``: as ``PODiffPipeline.sample``'s
    (None: the validation fields are shared among the ranks of an active process group, which all
    call this; False: this process samples them alone, e.g. rank 0 of a ``torchrun`` run)."""
    methods = ("members", "modes") + metrics.SPREAD_METHODS
    if method not in methods:
        raise ValueError(f"method must be one of {methods}; got {method!r}")
    if shape not in error_shape.ERROR_SHAPES:
        raise ValueError(f"shape must be one of {error_shape.ERROR_SHAPES}; got {shape!r}")
    metrics.check_spread_limits(limits)
    metrics.check_spread_limits(mode_limits, "mode_limits")
    if int(bands) != bands or bands < 1:
        raise ValueError(f"bands must be an integer >= 1; got {bands!r}")
    if method == "modes" and pipe.config.member_grids > 1:
        raise ValueError(f"method 'modes' scales each POD mode of one grid's tokens; member_grids="
                         f"{pipe.config.member_grids} draws members on several grids: use 'members'")
    if num_samples is None:
        num_samples = max(16, 2 * pipe.config.member_grids)
    pipe.calibration = Calibration()  # the ensemble as sampled
    members = method in ("members", "modes") or return_ensemble
    out = pipe.sample(lr_val, num_samples=num_samples, seed=seed, return_samples=members, distributed=distributed)
    if method == "modes":
        truth = pipe.target_tokens(hr_val.to(pipe.device), lr_val.to(pipe.device)).to(out.tokens)
        valid = pipe.pod.valid_locations().to(truth.device).view(1, -1).expand(truth.shape[:2])
        mean, var = out.tokens.mean(0), out.tokens.var(0)
        mode_spread = [metrics.calibrated_spread(mean[..., j], var[..., j], truth[..., j], "crps", mode_limits,
                                                 mask=valid)
                       for j in range(truth.shape[-1])]
        pipe.calibration = Calibration(mode_spread=mode_spread)
        out = pipe.sample(lr_val, num_samples=num_samples, seed=seed, return_samples=return_ensemble,
                          distributed=distributed)
    truth = hr_val.to(out.mean)
    if method == "members":
        k = metrics.members_spread(out.samples, truth, limits)
    else:
        k = metrics.calibrated_spread(out.mean, out.variance, truth, "moments" if method == "moments" else "crps",
                                      limits)
    quantiles = edges = None
    if shape == "validation":
        quantiles, edges = error_shape.fit_error_shape(out.mean, k**2 * out.variance, truth, bands)
    pipe.calibration = Calibration(k, pipe.calibration.mode_spread, quantiles, edges)
    if not return_ensemble:
        return k
    out.scale_spread(k)  # what pipe.sample now draws
    return k, out


__all__ = ["calibrate_spread"]
