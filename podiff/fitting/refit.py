"""Refitting on every field: the choices are made on held-out fields, the final model learns from all.

A model fitted with validation (``fit(..., validation=(lr_val, hr_val))``) has chosen its POD,
its ridge's settings and its number of steps on the held-out fields, which are the most recent
ones in a time series, and never learned from them. ``refit(pipe, lr, hr, (lr_val, hr_val))``
then

- refits the mean model (``residual="ridge"``) with the same settings on every field
  (``MeanModel.refitted``; its condition statistics, the data scaling and the POD stay), and
- continues training the denoiser from its best weights on the tokens of every field for
  ``continuation_steps`` steps: as many more steps as the held-out fields add at the chosen
  model's steps per field (``best_step · n_held / n_train``), the EMA warming up again from
  where the continuation starts so that it follows it.

The spread and the error shape are calibrated before the refit, on the held-out model's errors
on the held-out fields (``fitting.calibration``): out-of-sample errors of a model fitted on fewer
and older fields, so the intervals, if anything, widen for the refitted one.

>>> # pipe fitted with validation=(lr_val, hr_val) and calibrated on them:
>>> # refit(pipe, lr_train, hr_train, (lr_val, hr_val))   # -> {"from_step", "steps", "fields"}
"""

from __future__ import annotations

from pathlib import Path

import torch

from podiff.core import distributed as distributed_
from podiff.diffusion.training import Trainer, continuation_steps
from podiff.model.pipeline import check_pair


def refit(pipe, lr: torch.Tensor, hr: torch.Tensor, held_out: tuple[torch.Tensor, torch.Tensor], *,
          steps: int | None = None, progress: bool = True, checkpoint: str | Path | None = None,
          resume: bool = True, log_every: int = 50, distributed: bool | None = None) -> dict:
    """Refits a trained ``pipe`` on its training fields ``lr, hr`` (this rank's shard when
    distributed, as in ``fit``) and the ``held_out = (lr_val, hr_val)`` fields it was validated on
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
    if distributed and pipe.mean_model is not None:
        raise ValueError("residual training is not distributed yet; refit it in one process")
    n_train = (int(distributed_.all_sum(torch.tensor(hr.shape[0], device=device)).item()) if distributed
               else hr.shape[0])
    n_held = hr_val.shape[0]
    record = pipe.training
    chosen = record.best_step if record.best_step is not None else record.step
    steps = continuation_steps(chosen, n_train, n_held) if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    from_step = record.refit["from_step"] if record.refit else record.step  # a resumed refit keeps its start
    with torch.no_grad():
        if pipe.mean_model is not None:  # one process: every field through the refitted mean model's out-of-fold μ
            lr, hr = torch.cat([lr, lr_val]), torch.cat([hr, hr_val])
            pipe.mean_model = pipe.mean_model.refitted(lr, hr).to(device)
            mu = pipe.mean_model.out_of_fold(lr, hr)
            x0, cond = pipe.target_tokens(hr, lr, mu).float(), pipe.condition_tokens(lr, mu).float()
        else:  # this rank's training fields gathered across ranks, then the held-out ones (on every rank)
            gather = distributed_.all_gather_rows if distributed else (lambda t: t)
            x0 = torch.cat([gather(pipe.target_tokens(hr).float()), pipe.target_tokens(hr_val).float()])
            cond = torch.cat([gather(pipe.condition_tokens(lr).float()), pipe.condition_tokens(lr_val).float()])
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not resume or state.get("ema_from") != from_step:  # a continuation of another held-out training
            Path(checkpoint).unlink()
    record.refit = {"from_step": from_step, "steps": steps, "fields": int(x0.shape[0])}
    trainer = Trainer(pipe, distributed=distributed, ema_from=from_step)
    trainer.fit(x0, cond, from_step + steps, progress=progress, checkpoint=checkpoint, resume=resume,
                log_every=log_every)
    return dict(record.refit)


__all__ = ["continuation_steps", "refit"]
