"""Refitting on every field: the choices are made on held-out fields, the final model learns from all.

A model fitted with validation (``fit(..., validation=(lr_val, hr_val))``) has chosen its POD,
its ridge's settings and its number of steps on the held-out fields, which are the most recent
ones in a time series, and never learned from them. ``refit(pipe, lr, hr, (lr_val, hr_val))``
then

- refits the mean model (a residual model) with the same settings on every field
  (``MeanModel.refitted``; its condition statistics, the data scaling and the POD stay), and
- continues training the denoiser from its best weights on the tokens of every field for
  ``continuation_steps`` steps: as many more steps as the held-out fields add at the chosen
  model's steps per field (``best_step · n_held / n_train``), the EMA warming up again from
  where the continuation starts so that it follows it.

The spread and the error shape are calibrated before the refit, on the held-out model's errors
on the held-out fields (``fitting.calibration``): out-of-sample errors of a model fitted on fewer
and older fields. The refitted model errs less on the fields that follow (on a series with a
trend, much less: it has seen the recent fields), so its spread is the calibrated one times
``refit_error_ratio``: how much the mean model's error on the held-out fields fell when it was
fitted on the training fields rather than on the training fields less the last ``n_held`` of
them, the same step (``n_held`` more recent fields) taken one period back, out of sample in
time (checked on four time-split cases: estimated 0.85–0.99, realised on the test fields within
0.02 of it). ``refit_error_ratio`` is also what ``podiff train`` applies to the refitted
baselines' error spreads.

>>> # pipe fitted with validation=(lr_val, hr_val) and calibrated on them:
>>> # refit(pipe, lr_train, hr_train, (lr_val, hr_val))   # -> {"from_step", "steps", "fields"}
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from podiff.core import distributed as distributed_
from podiff.diffusion.training import Trainer, continuation_steps
from podiff.evaluation import metrics
from podiff.fitting.fit import FieldTokens
from podiff.mean.ridge import RidgeBaseline
from podiff.model.pipeline import check_pair

#: The ratio applied to the spread is clipped to these (as the calibration's factor is).
RATIO_LIMITS = (0.5, 2.0)


def refit_error_ratio(lr: torch.Tensor, hr: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor],
                      ridge: RidgeBaseline) -> tuple[float, dict]:
    """By how much refitting on ``n_held`` more recent fields cuts the error on the fields that
    follow, measured one period back: ``ridge`` (fitted on the training fields ``lr, hr`` ``[N,
    C+K, h, w]``, ``[N, C, H, W]``, in time order) and a ridge of its settings fitted on all but
    their last ``n_held`` fields, both scored (RMSE) on the ``held_out = (lr_val, hr_val)`` fields
    that follow them. Returns ``(ratio, about)``, the ratio clipped to ``RATIO_LIMITS``; 1.0
    (``about["skipped"]`` says why) with fewer than ``max(2, n_held)`` fields left to fit the
    older ridge on."""
    lr_val, hr_val = held_out
    n_train, n_held = hr.shape[0], hr_val.shape[0]
    if n_train - n_held < max(2, n_held):
        return 1.0, {"skipped": f"{n_train} training fields: too few to fit one without the last {n_held}"}
    lr64, hr64, lr_val64, hr_val64 = (t.detach().cpu().double() for t in (lr, hr, lr_val, hr_val))
    older = RidgeBaseline(**ridge.settings()).fit(lr64[: n_train - n_held], hr64[: n_train - n_held])
    recent_rmse = metrics.rmse(ridge.predict(lr_val64), hr_val64)
    older_rmse = metrics.rmse(older.predict(lr_val64), hr_val64)
    ratio = recent_rmse / older_rmse if older_rmse > 0 else 1.0
    if not math.isfinite(ratio):
        return 1.0, {"skipped": "no finite error on the held-out fields"}
    clipped = min(max(ratio, RATIO_LIMITS[0]), RATIO_LIMITS[1])
    return clipped, {"ratio": clipped, "rmse_recent": recent_rmse, "rmse_older": older_rmse,
                     "older_fields": n_train - n_held}


def refit(pipe, lr: torch.Tensor, hr: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor], *,
          steps: int | None = None, progress: bool = True, checkpoint: str | Path | None = None,
          resume: bool = True, log_every: int = 50, distributed: bool | None = None) -> dict:
    """Refits a trained ``pipe`` on its training fields ``lr, hr`` (this rank's shard when
    distributed, as in ``fit``: gathered, so that every rank refits the mean model and makes the
    tokens as one process does) and the ``held_out = (lr_val, hr_val)`` fields it was validated on
    (whole on every rank). ``steps``: the denoiser's continuation (default
    ``continuation_steps(best_step, n_train, n_held)``); ``checkpoint``: a file for the
    continuation (resumed from with ``resume``). Returns and records (``pipe.training.refit``)
    ``{"from_step", "steps", "fields"}``."""
    if pipe.denoiser is None or pipe.training.step == 0:
        raise RuntimeError("refit continues a trained model: fit it (with validation) first")
    lr_val, hr_val = held_out
    if lr_val is None or hr_val is None or hr_val.shape[0] == 0:
        raise ValueError("held_out must be the (lr_val, hr_val) fields the model was validated on; got none")
    device = pipe.device
    lr, hr, lr_val, hr_val = (t.to(device) for t in (lr, hr, lr_val, hr_val))
    check_pair(lr, hr, pipe.config.scale, pipe.num_covariates)
    check_pair(lr_val, hr_val, pipe.config.scale, pipe.num_covariates)
    distributed = distributed_.is_active() if distributed is None else bool(distributed)
    if distributed:  # every rank holds every training field, then refits as one process (the trainer shares steps)
        lr, hr = distributed_.all_gather_rows(lr), distributed_.all_gather_rows(hr)
    n_train = hr.shape[0]
    n_held = hr_val.shape[0]
    record = pipe.training
    chosen = record.best_step if record.best_step is not None else record.step
    steps = continuation_steps(chosen, n_train, n_held) if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    from_step = record.refit["from_step"] if record.refit else record.step  # a resumed refit keeps its start
    # the held-out model's spread, times the error ratio (once: a second refit starts from the same)
    held_out_spread = record.refit["held_out_spread"] if record.refit else pipe.calibration.spread
    if record.refit and "spread_ratio" in record.refit:  # measured with the held-out mean model, kept
        ratio, about = record.refit["spread_ratio"], record.refit["error_ratio"]
    else:
        ridge = (pipe.mean_model.ridge if pipe.mean_model is not None else
                 RidgeBaseline(pipe.config.scale, covariates=pipe.num_covariates).fit(lr.cpu().double(),
                                                                                     hr.cpu().double()))
        ratio, about = refit_error_ratio(lr, hr, (lr_val, hr_val), ridge)
    pipe.calibration = replace(pipe.calibration, spread=held_out_spread * ratio)
    with torch.no_grad():
        lr, hr = torch.cat([lr, lr_val]), torch.cat([hr, hr_val])
        mu = None
        if pipe.mean_model is not None:  # every field through the refitted mean model's out-of-fold μ
            pipe.mean_model = pipe.mean_model.refitted(lr, hr, held_out=n_held).to(device)
            mu = pipe.mean_model.out_of_fold(lr, hr)
        x0, cond = pipe.target_tokens(hr, lr, mu).float(), pipe.condition_tokens(lr, mu).float()
    fields = int(x0.shape[0])
    if pipe.training_windows().count > 1:  # shifted grids, crops: as the held-out training had
        x0, cond = FieldTokens(pipe, lr, hr, mu, tokens=(x0, cond)), None
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not resume or state.get("ema_from") != from_step:  # a continuation of another held-out training
            Path(checkpoint).unlink()
    record.refit = {"from_step": from_step, "steps": steps, "fields": fields, "spread_ratio": ratio,
                    "held_out_spread": held_out_spread, "error_ratio": about}
    trainer = Trainer(pipe, distributed=distributed, ema_from=from_step)
    trainer.fit(x0, cond, from_step + steps, progress=progress, checkpoint=checkpoint, resume=resume,
                log_every=log_every)
    return dict(record.refit)


__all__ = ["RATIO_LIMITS", "continuation_steps", "refit", "refit_error_ratio"]
