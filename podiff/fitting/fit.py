"""Fitting: what produces a ``PODiffPipeline``'s state from fields.

``build(pipe, lr, hr)`` fits the data scaling, the mean model (a residual model), the POD and
the noise correlation and creates the denoiser; ``fit(pipe, lr, hr, validation=...)`` builds (unless
built) and trains it with a ``diffusion.training.Trainer``; ``fit_streamed`` does so for fields
read from a file batch by batch. The spread and the error shape: ``fitting.calibration``.

>>> import torch
>>> from podiff import PODiffPipeline, PipelineConfig
>>> hr = torch.randn(12, 1, 16, 16).cumsum(-1) / 4                 # [N, C, H, W]
>>> lr = torch.nn.functional.avg_pool2d(hr, 4)                     # [N, C, h, w]
>>> pipe = PODiffPipeline(PipelineConfig(rank=8, train_steps=5, batch_size=4, residual="none",
...                                      denoiser=dict(width=32, depth=1, heads=2)))
>>> history = fit(pipe, lr, hr, progress=False)                   # device="cuda" on a GPU
>>> len(history), pipe.training.step
(5, 5)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from podiff.config import TrainOptions
from podiff.core import distributed as distributed_
from podiff.data import bounds as bounds_
from podiff.data.standardise import fit_scaling
from podiff.data.streaming import FieldStream
from podiff.diffusion.token_noise import GridCorrelation
from podiff.diffusion.training import Trainer, diffusion_loss, draw_noise
from podiff.latent.pod import PatchPOD
from podiff.latent.pod_selection import select_pod
from podiff.mean.mean_model import MeanModel
from podiff.model.pipeline import PODiffPipeline, check_pair

_OPTIONS = TrainOptions()


def hold_out(lr, hr, mask, validation):
    """``validation`` as a fraction: the last ``ceil(fraction·N)`` fields become ``(lr_val, hr_val)``."""
    if validation is None or isinstance(validation, (tuple, list)):
        return lr, hr, mask, validation
    fraction = float(validation)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation must be (lr_val, hr_val) or a fraction in (0, 1); got {validation!r}")
    n_val = max(1, math.ceil(fraction * hr.shape[0]))
    if hr.shape[0] - n_val < 2:
        raise ValueError(f"validation={fraction} of {hr.shape[0]} fields leaves {hr.shape[0] - n_val} to train on; "
                         f"training needs at least two")
    keep = hr.shape[0] - n_val
    if mask is not None and mask.dim() == 4 and mask.shape[0] == hr.shape[0]:
        mask = mask[:keep]
    return lr[:keep], hr[:keep], mask, (lr[keep:], hr[keep:])


def build(pipe, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None, *,
          progress: bool = False, distributed: bool = False) -> PODiffPipeline:
    """Fits the data scaling and the POD (unless a fitted one was given) on ``hr``, then builds
    the denoiser, schedule and EMA copy and measures the tokens' grid correlation (the noise,
    ``token_noise``); no training (``lr`` is only checked against ``hr``).
    The data are moved to ``pipe.device`` first: the fits and the model all run there."""
    lr, hr, mask = _checked_on_device(pipe, lr, hr, mask)
    _fit_covariate_scaling(pipe, lr, distributed)
    hr_fit, _, mu = _fit_mean_model(pipe, lr, hr, None, distributed=distributed)
    _build(pipe, hr_fit, mask, progress, distributed)
    _fit_condition(pipe, mu, distributed)
    with torch.no_grad():
        tokens = pipe.target_tokens(hr, lr, mu).float()
        _fit_noise_correlation(pipe, distributed_.all_gather_rows(tokens) if distributed else tokens)
    return pipe


def _fit_mean_model(pipe, lr, hr, validation, eval_every: int = _OPTIONS.eval_every,
                    patience: int | None = _OPTIONS.patience, progress: bool = False, distributed: bool = False):
    """A residual model: fits ``μ`` (chosen and tuned on ``validation``, ``MeanModel.fit``; a
    U-Net candidate with the training's ``eval_every``, ``patience`` and at most
    ``config.train_steps``) and returns the residual fields ``(hr − μ_oof(lr), hr_val −
    μ(lr_val), μ_oof(lr))`` with ``μ_oof`` the out-of-fold predictions of the training fields;
    otherwise ``(hr, hr_val, None)``. ``distributed``: ``lr, hr`` are this rank's shard; every rank
    fits the same mean model on every rank's fields (gathered; deterministic on the CPU, so the
    one-process model) and keeps the out-of-fold predictions of its own."""
    hr_val = None if validation is None else validation[1]
    cfg = pipe.config
    if cfg.residual == "none":
        return hr, hr_val, None
    cpu = None if validation is None else tuple(t.cpu() for t in validation)
    lr_all, hr_all = (distributed_.all_gather_rows(lr), distributed_.all_gather_rows(hr)) if distributed else (lr, hr)
    pipe.mean_model = MeanModel.fit(cfg.scale, lr_all.cpu(), hr_all.cpu(), cpu, len(cfg.covariates),
                                    cfg.residual, steps=cfg.train_steps, eval_every=eval_every, patience=patience,
                                    seed=cfg.seed + 3, progress=progress, **_mean_model_domain(cfg))
    mu = pipe.mean_model.out_of_fold(lr_all, hr_all)[_own_rows(lr.shape[0], distributed, lr.device)]
    if validation is not None:
        hr_val = validation[1].to(hr.device) - pipe.mean_model.predict(validation[0].to(hr.device))
    return hr - mu, hr_val, mu


def _own_rows(n: int, distributed: bool, device) -> slice:
    """Where this rank's ``n`` fields lie among every rank's, gathered in rank order (the count
    reduced on ``device``, the data's: nccl reduces CUDA tensors only)."""
    if not distributed:
        return slice(0, n)
    counts = distributed_.all_gather_rows(torch.tensor([n], device=device)).tolist()
    start = sum(counts[: distributed_.rank_world()[0]])
    return slice(start, start + n)


def _out_of_fold(pipe, lr, hr, distributed: bool) -> torch.Tensor:
    """The mean model's out-of-fold predictions of this rank's fields: the folds run over every
    rank's fields in rank order, as over the fields of one process."""
    if not distributed:
        return pipe.mean_model.out_of_fold(lr, hr)
    mu = pipe.mean_model.out_of_fold(distributed_.all_gather_rows(lr), distributed_.all_gather_rows(hr))
    return mu[_own_rows(lr.shape[0], distributed, lr.device)]


def _mean_model_domain(cfg) -> dict:
    """``MeanModel.fit``'s settings for a model of any domain: a shared ridge, a U-Net without
    position maps (nothing per location of the training grid)."""
    if cfg.domain != "any":
        return {}
    return {"placements": ("shared",), "unet": {"position_channels": 0}}


def _fit_covariate_scaling(pipe, lr, distributed: bool) -> None:
    """The covariate channels' mean and std over the training inputs (``config.covariates``)."""
    K = pipe.num_covariates
    if not K:
        pipe.covariate_offset = pipe.covariate_scale = None
        return
    cov = lr[:, lr.shape[1] - K :]
    pipe.covariate_offset, pipe.covariate_scale = fit_scaling(cov, ~torch.isnan(cov), distributed)


def _fit_condition(pipe, mu, distributed: bool = False) -> PODiffPipeline:
    if pipe.mean_model is not None:  # the statistics of every rank's fields
        pipe.mean_model.fit_condition(distributed_.all_gather_rows(mu) if distributed else mu,
                                      pipe.condition_coefficients)
        pipe.mean_model.to(pipe.device)
    return pipe


def _checked_on_device(pipe, lr, hr, mask):
    """``lr, hr, mask`` on ``pipe.device``, checked once for ``build`` and ``fit``."""
    lr, hr = lr.to(pipe.device), hr.to(pipe.device)
    mask = mask.to(pipe.device) if mask is not None else None
    check_pair(lr, hr, pipe.config.scale, pipe.num_covariates)
    return lr, hr, mask


def _build(pipe, hr: torch.Tensor, mask, progress: bool, distributed: bool,
           hr_val: torch.Tensor | None = None) -> PODiffPipeline:
    valid = ~torch.isnan(hr) if mask is None else (~torch.isnan(hr) & mask)
    pipe.offset, pipe.data_scale = fit_scaling(hr, valid, distributed)
    pipe.image_size = tuple(hr.shape[-2:])
    cfg = pipe.config
    if pipe.pod is None or not pipe.pod.fitted:  # a given unfitted POD (e.g. GlobalPOD) is fitted here
        hr_std = pipe.standardise(hr)
        if mask is not None:
            hr_std = hr_std.masked_fill(~mask, float("nan"))
        if pipe.pod is None and hr_val is not None and not distributed and (cfg.resolved_basis == "auto"
                                                                             or cfg.rank is None):
            # Basis and rank by held-out reconstruction (pod_selection); printed by the command.
            pipe.pod, pipe.pod_choice = select_pod(hr_std, pipe.standardise(hr_val.to(hr.device)),
                                                   cfg.patch_size, cfg.stride, energy=cfg.energy or 0.999,
                                                   basis=cfg.resolved_basis, rank=cfg.rank, offsets=cfg.shifted_grids)
        else:
            if pipe.pod is None:
                basis = "shared" if cfg.resolved_basis == "auto" else cfg.resolved_basis
                pipe.pod = PatchPOD(cfg.patch_size, cfg.stride, rank=cfg.rank, energy=cfg.energy, basis=basis)
            pod = pipe.pod  # shifted grids: a shared basis of the patches at every offset
            offsets = (cfg.shifted_grids and isinstance(pod, PatchPOD) and not pod.local
                       and pod.stride == pod.patch_size)
            pod.fit(hr_std, progress=progress, distributed=distributed, **({"offsets": True} if offsets else {}))
    pipe.build_model()
    return pipe.to(pipe.device)


def training_noise(pipe, x0: torch.Tensor, generator: torch.Generator | None = None, schedule=None):
    """The training noise for tokens ``x0 [B, L, r]``: times ``t [B] ~ U(0, t_max)`` and ``ε``
    (drawn from ``generator`` on its device, the CPU by default, and moved to ``x0``'s), correlated
    across the patch grid as the model's noise is."""
    schedule = schedule or pipe.schedule
    return draw_noise(x0.shape, schedule.t_max(pipe.config.prediction_type), generator, x0.device, x0.dtype,
                      colour=pipe.token_noise)


def _fit_noise_correlation(pipe, x0: torch.Tensor) -> None:
    """``correlated_noise``: the training tokens' lag-one grid correlations (``token_noise``)."""
    grid = tuple(pipe.pod.grid)
    if not pipe.config.correlated_noise or grid == (1, 1):
        pipe.noise_correlation = None
        return
    pipe.noise_correlation = GridCorrelation.fit(x0, grid, pipe.pod.valid_locations()).state()


def loss(pipe, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
         denoiser=None, schedule=None, noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The training loss for token batches ``x0, cond [B, L, r]`` (``training.diffusion_loss``).

    ``noise``: ``(t [B], ε [B, L, r])`` drawn already (``training_noise``); else drawn from ``generator``.
    """
    denoiser = denoiser or pipe.denoiser
    schedule = schedule or pipe.schedule
    t, eps = noise if noise is not None else training_noise(pipe, x0, generator, schedule)
    return diffusion_loss(x0, cond, t, eps, denoiser=denoiser, schedule=schedule,
                          prediction_type=pipe.config.prediction_type, smoothness=pipe.config.smoothness)


def fit(pipe, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None, *,
        steps: int | None = None, progress: bool = True, checkpoint: str | Path | None = None,
        checkpoint_every: int = _OPTIONS.checkpoint_every, resume: bool = True, log_every: int = 50,
        distributed: bool | None = None, device=None, amp: bool | None = None,
        validation: tuple[torch.Tensor, torch.Tensor] | float | None = None, eval_every: int = _OPTIONS.eval_every,
        patience: int | None = _OPTIONS.patience) -> list[float]:
    """Builds the pipeline (scaling, POD, model) unless built, then trains it with a ``Trainer``.

    Args:
        lr, hr: ``[N, C, h, w]`` and ``[N, C, h·scale, w·scale]``; NaN marks masked pixels. On
            any device: they are moved to ``device``. In a distributed run, this rank's
            contiguous shard (``distributed.shard``), in rank order.
        mask: optional bool ``[..., H, W]`` for ``hr`` (True = valid).
        steps: optimiser steps (default ``config.train_steps``), counted from 0 across resumes.
        checkpoint: a file written atomically every ``checkpoint_every`` steps and at the
            end (by rank 0); with ``resume`` an existing one is loaded (weights, EMA,
            optimiser, RNG, step, loss history) and training continues from its step. A
            checkpoint written on one device resumes on another.
        distributed: train with DistributedDataParallel over the default process group;
            None means "if one is initialised with more than one rank". The global batch is
            ``config.batch_size`` (divisible by the world size); standardisation, the POD
            fit and the tokens are reduced or gathered exactly, and every rank draws the
            same indices and noise, so the loss curve is the one-process curve.
        device: where to train (default: ``pipe.device``); the pipeline stays there.
        amp: bfloat16 autocast (None: ``config.amp`` on CUDA, off elsewhere).
        validation: ``(lr_val, hr_val)``, or a fraction: the last ``ceil(fraction·N)`` fields
            of ``lr, hr`` are held out (nothing of them enters the scaling, the POD or the
            training). The EMA model's validation loss is evaluated every ``eval_every``
            steps; training stops when it has not improved for ``patience`` evaluations
            (``steps`` is then an upper bound) and the best weights are kept
            (``pipe.training.best_step``, ``val_history``).

    Returns:
        The loss history (one value per step; the global-batch loss when distributed).
    """
    cfg = pipe.config
    if device is not None:
        pipe.to(device)
    lr, hr, mask = _checked_on_device(pipe, lr, hr, mask)
    if cfg.bounds is not None:
        bounds_.check_pairs(pipe.target_input(lr), hr, cfg.bounds, cfg.scale)
    lr, hr, mask, validation = hold_out(lr, hr, mask, validation)
    distributed = distributed_.is_active() if distributed is None else bool(distributed)
    # On the data's device: nccl reduces CUDA tensors only.
    total = (int(distributed_.all_sum(torch.tensor(hr.shape[0], device=hr.device)).item()) if distributed
             else hr.shape[0])
    if total < 2:
        raise ValueError(f"training needs at least two samples; got {total}")
    rank = distributed_.rank_world()[0] if distributed else 0
    mu = _prepare(pipe, lr, hr, mask, validation, progress and rank == 0, distributed, eval_every, patience)
    steps = _checked_steps(pipe, steps)
    with torch.no_grad():
        x0_all = distributed_.all_gather_rows(pipe.target_tokens(hr, lr, mu).float())
        cond_all = distributed_.all_gather_rows(pipe.condition_tokens(lr, mu).float())
    _fit_noise_correlation(pipe, x0_all)
    if pipe.training_windows().count > 1:  # shifted grids, crops: tokens made per batch from the fields
        gather = distributed_.all_gather_rows if distributed else (lambda t: t)
        mu_all = gather(mu) if mu is not None else None
        x0_all, cond_all = FieldTokens(pipe, gather(lr), gather(hr), mu_all, tokens=(x0_all, cond_all)), None
    trainer = Trainer(pipe, amp=amp, distributed=distributed)
    return trainer.fit(x0_all, cond_all, steps, progress=progress, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, resume=resume, log_every=log_every,
                       validation=_validation_tokens(pipe, validation), eval_every=eval_every, patience=patience)


def _prepare(pipe, lr, hr, mask, validation, progress: bool, distributed: bool,
             eval_every: int = _OPTIONS.eval_every, patience: int | None = _OPTIONS.patience):
    """Builds the pipeline on ``lr, hr`` unless built (mean model, scaling, POD, model) and
    returns the mean model's out-of-fold predictions of these fields (None without one)."""
    if pipe.denoiser is None:
        _fit_covariate_scaling(pipe, lr, distributed)
        hr_fit, hr_val_fit, mu = _fit_mean_model(pipe, lr, hr, validation, eval_every, patience, progress,
                                                 distributed)
        _build(pipe, hr_fit, mask, progress, distributed, hr_val=hr_val_fit)
        _fit_condition(pipe, mu, distributed)
        return mu
    # built or resumed: the same out-of-fold predictions again
    return _out_of_fold(pipe, lr, hr, distributed) if pipe.mean_model is not None else None


def _checked_steps(pipe, steps: int | None) -> int:
    steps = pipe.config.train_steps if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    return steps


@torch.no_grad()

def _validation_tokens(pipe, validation):
    if validation is None:
        return None
    lr_val, hr_val = (t.to(pipe.device) for t in validation)
    check_pair(lr_val, hr_val, pipe.config.scale, pipe.num_covariates)
    return pipe.target_tokens(hr_val, lr_val).float(), pipe.condition_tokens(lr_val).float()


def fit_streamed(pipe, stream, validation: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                 memory_bytes: int = 1 << 30, steps: int | None = None, progress: bool = True,
                 checkpoint: str | Path | None = None, checkpoint_every: int = _OPTIONS.checkpoint_every,
                 resume: bool = True,
                 log_every: int = 50, device=None, amp: bool | None = None, eval_every: int = _OPTIONS.eval_every,
                 patience: int | None = _OPTIONS.patience, distributed: bool | None = None) -> list[float]:
    """``fit`` for training fields that do not fit in memory: a ``streaming.FieldStream``.

    The data scaling, the ridge (tuned on ``validation``), the POD (and its choice) and the
    condition statistics are fitted on an evenly spaced subsample of the stream's fields of
    at most ``memory_bytes`` (``stream.subsample``); the denoiser is trained on all of them,
    each step reading and encoding its batch (``streaming.StreamedTokens``). ``validation``
    (``(lr_val, hr_val)``, in memory) and the other arguments are as in ``fit``. With
    ``config.bounds`` the subsample is checked against them as ``fit`` checks its fields.

    ``distributed`` (None: "if a process group with more than one rank is initialised"): every
    rank passes the same ``stream`` (opened lazily: nothing is read until asked) and reads only its
    contiguous share of its fields (``distributed.shard``): its part of the subsample for the fits
    (reduced exactly, as ``fit`` reduces), and of every global batch the rows it holds, the loss
    weighted by their share of the batch; so 2 ranks train the model 1 process trains, to float
    rounding. A residual model is fitted on the subsample gathered from every rank (the
    one-process fit), each rank keeping the out-of-fold predictions of its own fields.
    """

    if device is not None:
        pipe.to(device)
    distributed = distributed_.is_active() if distributed is None else bool(distributed)
    rank, world = distributed_.rank_world() if distributed else (0, 1)
    owned = distributed_.shard(len(stream), rank, world)
    positions = stream.subsample(memory_bytes)
    mine = [int(p) for p in positions if owned.start <= int(p) < owned.stop]
    lr, hr = stream.read(mine)
    lr, hr, _ = _checked_on_device(pipe, lr, hr, None)
    if pipe.config.bounds is not None:  # the subsample read stands for the stream
        bounds_.check_pairs(pipe.target_input(lr), hr, pipe.config.bounds, pipe.config.scale)
    mu = _prepare(pipe, lr, hr, None, validation, progress and rank == 0, distributed, eval_every, patience)
    with torch.no_grad():  # the subsample's tokens stand for all: one budget in memory
        tokens = pipe.target_tokens(hr, lr, mu).float()
        _fit_noise_correlation(pipe, distributed_.all_gather_rows(tokens) if distributed else tokens)
    del lr, hr, tokens
    steps = _checked_steps(pipe, steps)
    # a residual model's out-of-fold mu: of this rank's part of the subsample (every rank's, in one process)
    source = StreamedTokens(pipe, stream, mine, mu, owned=owned if distributed else None)
    trainer = Trainer(pipe, amp=amp, distributed=distributed)
    return trainer.fit(source, None, steps, progress=progress, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, resume=resume, log_every=log_every,
                       validation=_validation_tokens(pipe, validation), eval_every=eval_every,
                       patience=patience)


class FieldTokens:
    """The training tokens of fields in memory in every training window (shifted grids, crops:
    ``PODiffPipeline.training_windows``): a ``Trainer`` token source whose ``rows(idx, window)``
    encodes fields ``idx``' crop at ``window`` (``PODiffPipeline.window_tokens``) and whose
    ``windows.geometry(window)`` places them. ``lr, hr [N, ...]`` on the pipeline's device; ``mu``:
    a residual model's out-of-fold predictions of them; ``tokens``: their tokens on the fitted
    grid, if made already (the whole grid then reads them)."""

    def __init__(self, pipe, lr: torch.Tensor, hr: torch.Tensor, mu: torch.Tensor | None = None,
                 tokens: tuple[torch.Tensor, torch.Tensor] | None = None):
        if lr.shape[0] != hr.shape[0] or (mu is not None and mu.shape != hr.shape):
            raise ValueError(f"lr, hr and mu must hold the same fields; got {tuple(lr.shape)}, {tuple(hr.shape)}"
                             f" and {None if mu is None else tuple(mu.shape)}")
        self.pipe, self.lr, self.hr, self.mu, self.tokens = pipe, lr, hr, mu, tokens
        self.windows = pipe.training_windows()

    def __len__(self) -> int:
        return self.hr.shape[0]

    @torch.no_grad()
    def rows(self, idx: torch.Tensor, window=(0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.hr.device)
        if self.tokens is not None and self.windows.is_fitted(window):
            return self.tokens[0][idx.to(self.tokens[0].device)], self.tokens[1][idx.to(self.tokens[1].device)]
        mu = None if self.mu is None else self.mu[idx]
        return self.pipe.window_tokens(self.hr[idx], self.lr[idx], mu, window)


class StreamedTokens:
    """The training tokens of a ``FieldStream``, made per batch: a ``Trainer`` token source.

    ``rows(idx)`` reads fields ``idx``, and returns their target and condition tokens on the
    pipeline's device. For a residual pipeline, the fields its ridge was fitted on (``fitted``
    positions) use their out-of-fold predictions (``mu``, in the same order), as
    in-memory training does; every other field's ridge mu is out of sample already.
    ``owned``: the slice of the stream's positions this rank reads (a distributed run);
    ``owns(idx)`` says which of a global batch's rows they are.
    """

    def __init__(self, pipe, stream: FieldStream, fitted=None, mu: torch.Tensor | None = None,
                 owned: slice | None = None):
        self.pipe, self.stream = pipe, stream
        self.mu = mu.to(pipe.device) if mu is not None else None
        self.row_of = {int(p): i for i, p in enumerate(fitted)} if mu is not None else {}
        self.windows = pipe.training_windows()
        self.owned = owned

    def owns(self, idx: torch.Tensor) -> torch.Tensor:
        """Which of the positions ``idx`` this rank reads (all, outside a distributed run)."""
        if self.owned is None:
            return torch.ones(idx.shape, dtype=torch.bool)
        return (idx >= self.owned.start) & (idx < self.owned.stop)

    def __len__(self) -> int:
        return len(self.stream)

    @torch.no_grad()
    def rows(self, idx: torch.Tensor, window=(0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        positions = idx.cpu().numpy()
        lr, hr = (t.to(pipe.device) for t in self.stream.read(positions))
        mu = None
        if pipe.mean_model is not None:
            mu = pipe.mean_model.predict(lr)
            own = [(i, self.row_of[int(p)]) for i, p in enumerate(positions) if int(p) in self.row_of]
            if own:
                at, rows = (torch.tensor(v, device=lr.device) for v in zip(*own, strict=False))
                mu[at] = self.mu[rows].to(mu.dtype)
        return pipe.window_tokens(hr, lr, mu, window)


__all__ = ["FieldTokens", "StreamedTokens", "build", "fit", "fit_streamed", "hold_out", "loss", "training_noise"]
