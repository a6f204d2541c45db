"""``PODiffPipeline``: conditional super-resolution by diffusion over POD tokens, with
closed-form pixel uncertainty.

>>> import torch
>>> hr = torch.randn(12, 1, 16, 16).cumsum(-1) / 4                 # [N, C, H, W]
>>> lr = torch.nn.functional.avg_pool2d(hr, 4)                     # [N, C, h, w]
>>> pipe = PODiffPipeline(PipelineConfig(scale=4, patch_size=4, rank=8, train_steps=5, batch_size=4,
...                                      denoiser=dict(width=32, depth=1, heads=2)))
>>> history = pipe.fit(lr[:10], hr[:10], progress=False)          # device="cuda" on a GPU
>>> out = pipe.sample(lr[10:], num_samples=4, steps=3, seed=0)
>>> out.mean.shape, out.variance.shape                           # [B, C, H, W] each, NaN on masked pixels
(torch.Size([2, 1, 16, 16]), torch.Size([2, 1, 16, 16]))

Pieces: the data scaling (``standardise``); a fitted ``PatchPOD`` on the standardised
high-resolution fields; condition tokens = the POD encoding of the bicubic-upsampled
low-resolution field; a ``PODDenoiser`` (or ``MLPDenoiser`` for one token) trained with ε- or
v-prediction on standardised tokens by a ``Trainer`` (``training``); a noise schedule (fixed
or learned); a ``DiffusionScheduler``. Sampling runs all ``M`` members of all images as one
batched chain (chunked to ``member_budget`` tokens), then ``ensemble_moments`` +
``decode_moments`` give the pixel mean and variance (block by default) without decoding the
members, and undo the data scaling (offset, scale²). ``save``/``load``: ``persistence``.

Device: everything (weights, EMA, optimiser state, POD basis, data scaling, tokens, noise)
lives on ``pipe.device``; ``fit(device=...)``, ``to(device)`` and ``load(..., device=...)``
choose it. Weights are initialised on the CPU from ``config.seed`` and moved, and noise is
drawn from CPU generators and moved, so a CPU and a CUDA run start from the same weights and
the same noise; their results agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import podiff_kernels as pk

from . import bounds as bounds_
from . import distributed as distributed_
from . import error_shape, metrics
from .config import PipelineConfig
from .data import block_average
from .denoiser import DenoiserConfig, MLPDenoiser, PODDenoiser
from .persistence import load_pipeline, save_pipeline
from .io import atomic_write  # noqa: F401  (re-exported for callers)
from .pod import PatchPOD
from .pod_selection import select_pod
from .residual import MeanModel
from .sample_output import SampleOutput
from .sampling import DiffusionScheduler, RowNoise, member_seed
from .schedules import make_schedule
from .standardise import fit_scaling, standardise, unstandardise
from .token_noise import GridCorrelation
from .training import Trainer, autocast, diffusion_loss, draw_noise


def _check_pair(lr: torch.Tensor, hr: torch.Tensor | None, scale: int) -> None:
    for name, x in (("lr", lr), ("hr", hr)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise ValueError(f"{name} must be a floating [N, C, H, W] tensor; got {getattr(x, 'shape', type(x))}")
        infinite = torch.isinf(x)
        if bool(infinite.any()):  # NaN marks masked pixels; ±Inf is a data error
            where = tuple(int(i) for i in infinite.nonzero()[0])
            raise ValueError(f"{name} has an infinite value at {where}; mark masked pixels with NaN or fix the data")
    if hr is None:
        return
    if lr.shape[0] != hr.shape[0]:
        raise ValueError(f"lr and hr must hold the same number of samples; got {lr.shape[0]} and {hr.shape[0]}")
    if lr.shape[1] != hr.shape[1]:
        raise ValueError(f"lr and hr must have the same channels; got {lr.shape[1]} and {hr.shape[1]}")
    expected = (lr.shape[2] * scale, lr.shape[3] * scale)
    if tuple(hr.shape[-2:]) != expected:
        raise ValueError(f"hr must be scale={scale} times lr's size {tuple(lr.shape[-2:])} = {expected}; "
                         f"got {tuple(hr.shape[-2:])}")


def _hold_out(lr, hr, mask, validation):
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


def _on_device(module: nn.Module, device: torch.device) -> bool:
    """Every parameter and buffer already on ``device`` (``cuda`` matches ``cuda:0``)."""
    def same(d: torch.device) -> bool:
        return d.type == device.type and (device.index is None or d.index is None or d.index == device.index)

    return all(same(t.device) for t in list(module.parameters()) + list(module.buffers()))


def upsample(lr: torch.Tensor, size) -> torch.Tensor:
    """Bicubic upsampling to ``size``; masked (NaN) pixels filled first with the image's valid mean
    so they do not spread (they stay masked through the POD's mask)."""
    valid = ~torch.isnan(lr)
    fill = torch.where(valid, lr, 0.0).sum((-2, -1), keepdim=True) / valid.sum((-2, -1), keepdim=True).clamp_min(1)
    filled = torch.where(valid, lr, fill)
    return F.interpolate(filled, size=tuple(size), mode="bicubic", align_corners=False)


class PODiffPipeline:
    """Train, sample and save a Patch-PODiff-ViT model (see the module docstring).

    Args:
        config: the model and its training (``PipelineConfig``).
        pod: a fitted ``PatchPOD`` (or ``GlobalPOD``) to use instead of fitting one; an unfitted
            one is fitted by ``build``.
        device: where the model lives and runs (default CPU; ``to`` moves it).
    """

    def __init__(self, config: PipelineConfig | None = None, pod: PatchPOD | None = None, device=None):
        self.config = config or PipelineConfig()
        self.pod = pod
        self.denoiser: nn.Module | None = None
        self.ema: nn.Module | None = None
        self.schedule = None
        self.offset = self.data_scale = None  # per channel, [C]
        self.image_size: tuple[int, int] | None = None
        self.history: list[float] = []
        self.val_history: list[tuple[int, float]] = []  # (step, EMA validation loss)
        self.best_step: int | None = None
        self.pod_choice: dict | None = None  # how the POD was chosen (pod_selection), when it was
        self.mean_model: MeanModel | None = None  # residual="ridge": μ(lr), the diffusion models x − μ
        self.step_count = 0
        self._device = torch.device(device if device is not None else "cpu")

    # ------------------------------------------------------------------ device

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> "PODiffPipeline":
        """Moves the weights, EMA, schedule, POD basis and data scaling to ``device``; returns self."""
        device = torch.device(device)
        for module in (self.denoiser, self.schedule, self.ema):
            if module is not None and not _on_device(module, device):  # moving in place is enough
                module.to(device)
        if self.pod is not None and self.pod.fitted:
            self.pod.to(device)
        if self.offset is not None:
            self.offset, self.data_scale = self.offset.to(device), self.data_scale.to(device)
        if self.mean_model is not None and self.mean_model.cond_mean is not None:
            self.mean_model.to(device)
        self._device = device
        return self

    # ------------------------------------------------------------------ data <-> tokens

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return standardise(x, self.offset, self.data_scale)

    def condition_tokens(self, lr: torch.Tensor, prediction: torch.Tensor | None = None) -> torch.Tensor:
        """``lr [B, C, h, w]`` -> standardised condition tokens ``[B, L, r]``: the bicubic-upsampled
        field, masked where the high-resolution fields are (so a coastal patch is encoded from its
        ocean pixels only, as its target is)."""
        if self.mean_model is not None:  # residual: μ(lr)'s anomaly, unit RMS per mode
            prediction = self.mean_model.predict(lr) if prediction is None else prediction
            return self._condition_coefficients(prediction) / self.mean_model.cond_scale.to(lr)
        up = upsample(self._standardise(lr), self.image_size)
        return self.pod.encode(up.masked_fill(~self.pod.valid_pixels.to(up.device), float("nan")))

    def _condition_coefficients(self, prediction: torch.Tensor) -> torch.Tensor:
        if self.config.condition == "detail":  # what μ adds below the input grid: blind to level and trend
            field = prediction - upsample(block_average(prediction, self.config.scale), self.image_size)
        else:
            field = self.mean_model.condition_field(prediction)
        field = field / self.data_scale.view(1, -1, 1, 1).to(prediction)
        field = field.masked_fill(~self.pod.valid_pixels.to(field.device), float("nan"))
        return self.pod.encode(field, standardized=False)

    def target_tokens(self, hr: torch.Tensor, lr: torch.Tensor | None = None,
                      prediction: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised tokens of ``hr`` (of its residual ``hr − μ(lr)`` when residual; ``lr`` or
        ``μ``'s ``prediction`` needed then)."""
        if self.mean_model is not None:
            if lr is None and prediction is None:
                raise ValueError("a residual pipeline's target tokens need lr (the target is hr − μ(lr))")
            hr = hr - (self.mean_model.predict(lr) if prediction is None else prediction)
        return self.pod.encode(self._standardise(hr))

    # ------------------------------------------------------------------ building

    def build(self, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None, *,
              progress: bool = False, distributed: bool = False) -> "PODiffPipeline":
        """Fits the data scaling and the POD (unless a fitted one was given) on ``hr``, then builds
        the denoiser, schedule and EMA copy and measures the tokens' grid correlation (the noise,
        ``token_noise``); no training (``lr`` is only checked against ``hr``).
        The data are moved to ``self.device`` first: the fits and the model all run there."""
        lr, hr, mask = self._checked_on_device(lr, hr, mask)
        hr_fit, _, prediction = self._fit_mean_model(lr, hr, None)
        self._build(hr_fit, mask, progress, distributed)
        self._fit_condition(prediction)
        with torch.no_grad():
            tokens = self.target_tokens(hr, lr, prediction).float()
            self._fit_noise_correlation(distributed_.all_gather_rows(tokens) if distributed else tokens)
        return self

    def _fit_mean_model(self, lr, hr, validation):
        """``residual="ridge"``: fits ``μ`` (tuned on ``validation``) and returns the residual fields
        ``(hr − μ_oof(lr), hr_val − μ(lr_val), μ_oof(lr))`` with ``μ_oof`` the out-of-fold
        predictions of the training fields; otherwise ``(hr, hr_val, None)``."""
        hr_val = None if validation is None else validation[1]
        if self.config.residual == "none":
            return hr, hr_val, None
        cpu = None if validation is None else tuple(t.cpu() for t in validation)
        self.mean_model = MeanModel.fit(self.config.scale, lr.cpu(), hr.cpu(), cpu)
        prediction = self.mean_model.out_of_fold(lr, hr)
        if validation is not None:
            hr_val = validation[1].to(hr.device) - self.mean_model.predict(validation[0].to(hr.device))
        return hr - prediction, hr_val, prediction

    def _fit_condition(self, prediction) -> "PODiffPipeline":
        if self.mean_model is not None:
            self.mean_model.fit_condition(prediction, self._condition_coefficients)
            self.mean_model.to(self._device)
        return self

    def _checked_on_device(self, lr, hr, mask):
        """``lr, hr, mask`` on ``self.device``, checked once for ``build`` and ``fit``."""
        lr, hr = lr.to(self._device), hr.to(self._device)
        mask = mask.to(self._device) if mask is not None else None
        _check_pair(lr, hr, self.config.scale)
        return lr, hr, mask

    def _build(self, hr: torch.Tensor, mask, progress: bool, distributed: bool,
               hr_val: torch.Tensor | None = None) -> "PODiffPipeline":
        valid = ~torch.isnan(hr) if mask is None else (~torch.isnan(hr) & mask)
        self.offset, self.data_scale = fit_scaling(hr, valid, distributed)
        self.image_size = tuple(hr.shape[-2:])
        cfg = self.config
        if self.pod is None or not self.pod.fitted:  # a given unfitted POD (e.g. GlobalPOD) is fitted here
            hr_std = self._standardise(hr)
            if mask is not None:
                hr_std = hr_std.masked_fill(~mask, float("nan"))
            if self.pod is None and hr_val is not None and not distributed and (cfg.basis == "auto"
                                                                                 or cfg.rank is None):
                # Basis and rank by held-out reconstruction (pod_selection); printed by the command.
                self.pod, self.pod_choice = select_pod(hr_std, self._standardise(hr_val.to(hr.device)),
                                                       cfg.patch_size, cfg.stride, energy=cfg.energy or 0.999,
                                                       basis=cfg.basis, rank=cfg.rank)
            else:
                if self.pod is None:
                    basis = "shared" if cfg.basis == "auto" else cfg.basis
                    self.pod = PatchPOD(cfg.patch_size, cfg.stride, rank=cfg.rank, energy=cfg.energy, basis=basis)
                self.pod.fit(hr_std, progress=progress, distributed=distributed)
        self.build_model()
        return self.to(self._device)

    def build_model(self, denoiser_config: dict | None = None) -> None:
        """Creates the denoiser, schedule and EMA for the POD's rank and grid, initialised on the
        CPU from ``config.seed`` (so every device starts from the same weights), on ``self.device``."""
        cfg = self.config
        if denoiser_config is None:
            noise_input = "per_token" if cfg.schedule == "learned" else "time"
            dcfg = DenoiserConfig.preset(cfg.preset, rank=self.pod.rank, grid=self.pod.grid, noise_input=noise_input,
                                         **cfg.denoiser)
        else:
            dcfg = DenoiserConfig(**denoiser_config)
        torch.manual_seed(cfg.seed)
        self.denoiser = (PODDenoiser if cfg.denoiser_kind == "vit" else MLPDenoiser)(dcfg)
        self.schedule = make_schedule(cfg.schedule, rank=dcfg.rank, prediction=cfg.prediction)
        self.ema = copy.deepcopy(nn.ModuleList([self.denoiser, self.schedule])).requires_grad_(False)
        for module in (self.denoiser, self.schedule, self.ema):
            module.to(self._device)

    @property
    def noise_input(self) -> str:
        return self.denoiser.config.noise_input

    # ------------------------------------------------------------------ training

    def draw_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None, schedule=None):
        """The training noise for tokens ``x0 [B, L, r]``: times ``t [B] ~ U(0, t_max)`` and ``ε``
        (drawn from ``generator`` on its device, the CPU by default, and moved to ``x0``'s)."""
        schedule = schedule or self.schedule
        t, eps = draw_noise(x0.shape, schedule.t_max(self.config.prediction), generator, x0.device, x0.dtype)
        colour = self.token_noise
        return t, (eps if colour is None else colour(eps))

    @property
    def token_noise(self) -> GridCorrelation | None:
        """The grid-correlated noise map (``config.noise_correlation``), or None for white noise."""
        state = self.config.noise_correlation
        if state is None:
            return None
        if getattr(self, "_token_noise_state", None) is not state:  # cached per fitted state
            self._token_noise, self._token_noise_state = GridCorrelation.from_state(state), state
        return self._token_noise

    def _fit_noise_correlation(self, x0: torch.Tensor) -> None:
        """``correlated_noise``: the training tokens' lag-one grid correlations (``token_noise``)."""
        grid = tuple(self.pod.grid)
        if not self.config.correlated_noise or grid == (1, 1):
            self.config.noise_correlation = None
            return
        self.config.noise_correlation = GridCorrelation.fit(x0, grid, self.pod.valid_locations()).state()

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
             denoiser=None, schedule=None, noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The training loss for token batches ``x0, cond [B, L, r]`` (``training.diffusion_loss``).

        ``noise``: ``(t [B], ε [B, L, r])`` drawn already (``draw_noise``); else drawn from ``generator``.
        """
        denoiser = denoiser or self.denoiser
        schedule = schedule or self.schedule
        t, eps = noise if noise is not None else self.draw_noise(x0, generator, schedule)
        return diffusion_loss(x0, cond, t, eps, denoiser=denoiser, schedule=schedule,
                              prediction=self.config.prediction, smoothness=self.config.smoothness)

    def fit(self, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None, *,
            steps: int | None = None, progress: bool = True, checkpoint: str | Path | None = None,
            checkpoint_every: int = 200, resume: bool = True, log_every: int = 50,
            distributed: bool | None = None, device=None, amp: bool | None = None,
            validation: tuple[torch.Tensor, torch.Tensor] | float | None = None, eval_every: int = 50,
            patience: int | None = 8) -> list[float]:
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
            device: where to train (default: ``self.device``); the pipeline stays there.
            amp: bfloat16 autocast (None: ``config.amp`` on CUDA, off elsewhere).
            validation: ``(lr_val, hr_val)``, or a fraction: the last ``ceil(fraction·N)`` fields
                of ``lr, hr`` are held out (nothing of them enters the scaling, the POD or the
                training). The EMA model's validation loss is evaluated every ``eval_every``
                steps; training stops when it has not improved for ``patience`` evaluations
                (``steps`` is then an upper bound) and the best weights are kept
                (``best_step``, ``val_history``).

        Returns:
            The loss history (one value per step; the global-batch loss when distributed).
        """
        cfg = self.config
        if device is not None:
            self.to(device)
        lr, hr, mask = self._checked_on_device(lr, hr, mask)
        if cfg.bounds is not None:
            bounds_.check_pairs(lr, hr, cfg.bounds, cfg.scale)
        lr, hr, mask, validation = _hold_out(lr, hr, mask, validation)
        distributed = distributed_.is_active() if distributed is None else bool(distributed)
        # On the data's device: nccl reduces CUDA tensors only.
        total = (int(distributed_.all_sum(torch.tensor(hr.shape[0], device=hr.device)).item()) if distributed
                 else hr.shape[0])
        if total < 2:
            raise ValueError(f"training needs at least two samples; got {total}")
        if self.denoiser is None and distributed and cfg.residual != "none":
            raise ValueError("residual training is not distributed yet; train it in one process "
                             "(or pass --residual none)")
        rank = distributed_.rank_world()[0] if distributed else 0
        prediction = self._prepare(lr, hr, mask, validation, progress and rank == 0, distributed)
        steps = self._checked_steps(steps)
        with torch.no_grad():
            x0_all = distributed_.all_gather_rows(self.target_tokens(hr, lr, prediction).float())
            cond_all = distributed_.all_gather_rows(self.condition_tokens(lr, prediction).float())
        self._fit_noise_correlation(x0_all)
        trainer = Trainer(self, amp=amp, distributed=distributed)
        return trainer.fit(x0_all, cond_all, steps, progress=progress, checkpoint=checkpoint,
                           checkpoint_every=checkpoint_every, resume=resume, log_every=log_every,
                           validation=self._validation_tokens(validation), eval_every=eval_every, patience=patience)

    def _prepare(self, lr, hr, mask, validation, progress: bool, distributed: bool):
        """Builds the pipeline on ``lr, hr`` unless built (mean model, scaling, POD, model) and
        returns the mean model's out-of-fold predictions of these fields (None without one)."""
        if self.denoiser is None:
            hr_fit, hr_val_fit, prediction = self._fit_mean_model(lr, hr, validation)
            self._build(hr_fit, mask, progress, distributed, hr_val=hr_val_fit)
            self._fit_condition(prediction)
            return prediction
        # built or resumed: the same out-of-fold predictions again
        return self.mean_model.out_of_fold(lr, hr) if self.mean_model is not None else None

    def _checked_steps(self, steps: int | None) -> int:
        steps = self.config.train_steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        return steps

    @torch.no_grad()
    def _validation_tokens(self, validation):
        if validation is None:
            return None
        lr_val, hr_val = (t.to(self._device) for t in validation)
        _check_pair(lr_val, hr_val, self.config.scale)
        return self.target_tokens(hr_val, lr_val).float(), self.condition_tokens(lr_val).float()

    def fit_streamed(self, stream, validation: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                     memory_bytes: int = 1 << 30, steps: int | None = None, progress: bool = True,
                     checkpoint: str | Path | None = None, checkpoint_every: int = 200, resume: bool = True,
                     log_every: int = 50, device=None, amp: bool | None = None, eval_every: int = 50,
                     patience: int | None = 8) -> list[float]:
        """``fit`` for training fields that do not fit in memory: a ``streaming.FieldStream``.

        The data scaling, the ridge (tuned on ``validation``), the POD (and its choice) and the
        condition statistics are fitted on an evenly spaced subsample of the stream's fields of
        at most ``memory_bytes`` (``stream.subsample``); the denoiser is trained on all of them,
        each step reading and encoding its batch (``streaming.StreamedTokens``). ``validation``
        (``(lr_val, hr_val)``, in memory) and the other arguments are as in ``fit``. One process.
        With ``config.bounds`` the subsample is checked against them as ``fit`` checks its fields.
        """
        from .streaming import StreamedTokens

        if device is not None:
            self.to(device)
        positions = stream.subsample(memory_bytes)
        lr, hr = stream.read(positions)
        lr, hr, _ = self._checked_on_device(lr, hr, None)
        if self.config.bounds is not None:  # the subsample read stands for the stream
            bounds_.check_pairs(lr, hr, self.config.bounds, self.config.scale)
        prediction = self._prepare(lr, hr, None, validation, progress, False)
        with torch.no_grad():  # the subsample's tokens stand for all: one budget in memory
            self._fit_noise_correlation(self.target_tokens(hr, lr, prediction).float())
        del lr, hr
        steps = self._checked_steps(steps)
        tokens = StreamedTokens(self, stream, positions, prediction)
        return Trainer(self, amp=amp).fit(tokens, None, steps, progress=progress, checkpoint=checkpoint,
                                          checkpoint_every=checkpoint_every, resume=resume, log_every=log_every,
                                          validation=self._validation_tokens(validation), eval_every=eval_every,
                                          patience=patience)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, num_samples: int, steps: int | None = None,
                      seed: int | None = None, member_budget: int = 1 << 20, use_ema: bool = True,
                      progress: bool = False, image_ids=None, amp: bool | None = None,
                      sampler: str | None = None) -> torch.Tensor:
        """``M`` members for condition tokens ``[B, L, r]`` -> ``[M, B, L, r]``, in chunks of at most
        ``member_budget`` token values per call. ``sampler`` (None: ``config.sampler``) is one of
        ``podiff.sampling.SAMPLERS``, e.g. ``"dpmsolver++"`` for few steps.

        Member ``m`` of image ``b`` draws its noise from its own CPU generator, seeded by
        ``(seed, image_ids[b], m)`` (``image_ids`` defaults to ``0..B-1``), moved to ``cond``'s
        device: the same seed gives the same samples whatever the chunking, the batch or the
        number of ranks, and the same noise on every device. ``amp``: bfloat16 autocast for the
        denoiser (None: ``config.amp`` on CUDA, off elsewhere); the sampler's updates stay float32.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        denoiser, schedule = (self.ema[0], self.ema[1]) if use_ema else (self.denoiser, self.schedule)
        scheduler = DiffusionScheduler(schedule, cfg.prediction, sampler or cfg.sampler, cfg.eta)
        steps = cfg.sample_steps if steps is None else int(steps)
        amp = (cfg.amp and cond.device.type == "cuda") if amp is None else bool(amp)
        B, L, r = cond.shape
        seed = cfg.seed if seed is None else int(seed)
        ids = list(range(B)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != B:
            raise ValueError(f"image_ids must hold one id per image ({B}); got {len(ids)}")
        # Antithetic pairs (config.antithetic): member 2k+1 runs the mirror chain of member 2k (the
        # same noise, negated), which cancels the ensemble mean's leading Monte-Carlo error; each
        # member is still a sample of the model.
        pair = 2 if cfg.antithetic else 1
        seeds = [member_seed(seed, i, m // pair) for m in range(num_samples) for i in ids]  # member-major, like flat
        signs = [(-1.0 if cfg.antithetic and m % 2 else 1.0) for m in range(num_samples) for _ in ids]
        flat = cond[None].expand(num_samples, B, L, r).reshape(num_samples * B, L, r)
        chunk = max(1, member_budget // max(1, L * r))
        colour = self.token_noise

        def noise_for(rows: slice):
            white = RowNoise(seeds[rows], cond.device, signs[rows])
            return white if colour is None else (lambda shape, dtype: colour(white(shape, dtype)))

        was_training = denoiser.training
        denoiser.eval()
        starts = range(0, flat.shape[0], chunk)
        with autocast(cond.device, amp):
            out = [scheduler.sample(denoiser, flat[i : i + chunk], steps, noise_input=self.noise_input,
                                    noise=noise_for(slice(i, i + chunk)))
                   for i in tqdm(starts, disable=not progress, desc="sample", unit="chunk")]
        denoiser.train(was_training)
        return torch.cat(out).view(num_samples, B, L, r)

    @torch.no_grad()
    def ensemble(self, cond: torch.Tensor, num_samples: int, steps: int | None = None, *, seed: int | None = None,
                 variance: str = "block", return_samples: bool = False, member_budget: int = 1 << 20,
                 progress: bool = False, image_ids=None, amp: bool | None = None,
                 sampler: str | None = None) -> SampleOutput:
        """The ensemble from condition tokens ``[B, L, r]`` (``condition_tokens(lr)``): sampling,
        ensemble moments, closed-form pixel moments, data units. ``sample`` checks its input and
        calls this; no device value is read here, so it also runs under ``FakeTensorMode``."""
        tokens = self.sample_tokens(cond, int(num_samples), steps, seed, member_budget, progress=progress,
                                    image_ids=image_ids, amp=amp, sampler=sampler)
        if self.config.mode_spread is not None:  # per-mode spread (calibrate_spread(method="modes"))
            factors = self.config.mode_spread
            if len(factors) != tokens.shape[-1]:
                raise ValueError(f"config.mode_spread holds {len(factors)} factors; the POD has {tokens.shape[-1]} modes")
            centre = tokens.mean(0, keepdim=True)
            tokens = centre + (tokens - centre) * torch.tensor(factors, dtype=tokens.dtype).to(tokens.device)
        mean_tok, cov = pk.ensemble_moments(tokens, diagonal=variance == "diagonal")
        mean, var = self.pod.decode_moments(mean_tok, cov)
        mean = unstandardise(mean, self.offset, self.data_scale)
        var = var * self.data_scale.view(1, -1, 1, 1).to(var) ** 2
        samples = None
        if return_samples:
            M, B = tokens.shape[:2]
            decoded = self.pod.decode(tokens.reshape(M * B, *tokens.shape[2:]))
            samples = unstandardise(decoded, self.offset, self.data_scale).view(M, B, *decoded.shape[1:])
        return SampleOutput(mean, var, samples, tokens if return_samples else None)

    @torch.no_grad()
    def sample(self, lr: torch.Tensor, num_samples: int = 16, steps: int | None = None, *,
               seed: int | None = None, variance: str = "block", return_samples: bool = False,
               member_budget: int = 1 << 20, progress: bool = False, image_ids=None,
               distributed: bool | None = None, amp: bool | None = None,
               sampler: str | None = None) -> SampleOutput:
        """Ensemble super-resolution of ``lr [B, C, h, w]`` (any device; moved to ``self.device``).

        Returns ``SampleOutput`` with the pixel ``mean`` and ``variance`` ``[B, C, H, W]`` on
        ``self.device`` (analytic: ``variance="block"`` uses each token's r×r covariance,
        ``"diagonal"`` only its diagonal), and with ``return_samples`` the decoded members
        ``[M, B, C, H, W]``. ``image_ids`` name the images for seeding (default ``0..B-1``; see
        ``sample_tokens``): the same seed gives the same ensemble on the same device for any
        chunking or sharding; a CPU and a CUDA run share the noise and agree to float rounding.
        ``distributed`` (None: when a multi-rank group is initialised): every rank passes the
        same ``lr``, samples its contiguous share of the images and gets the gathered result,
        equal to the one-process result up to float rounding. ``sampler``: see ``sample_tokens``.
        """
        if self.denoiser is None:
            raise RuntimeError("this pipeline is not trained; call fit(lr, hr) or PODiffPipeline.load(dir)")
        if variance not in ("block", "diagonal"):
            raise ValueError(f"variance must be 'block' or 'diagonal'; got {variance!r}")
        if int(num_samples) < 2:
            raise ValueError(f"num_samples must be >= 2 for a variance; got {num_samples}")
        _check_pair(lr, None, self.config.scale)
        expected = (self.image_size[0] // self.config.scale, self.image_size[1] // self.config.scale)
        if tuple(lr.shape[-2:]) != expected or lr.shape[1] != self.offset.numel():
            raise ValueError(f"lr must be [B, {self.offset.numel()}, {expected[0]}, {expected[1]}] (the trained size); "
                             f"got {tuple(lr.shape)}")
        ids = torch.arange(lr.shape[0]) if image_ids is None else torch.as_tensor(image_ids).cpu()
        if ids.shape != (lr.shape[0],):
            raise ValueError(f"image_ids must hold one id per image ({lr.shape[0]}); got shape {tuple(ids.shape)}")
        distributed = distributed_.is_active() if distributed is None else bool(distributed)
        if distributed:
            rows = distributed_.shard(lr.shape[0], *distributed_.rank_world())
            lr, ids = lr[rows], ids[rows]
        cond = self.condition_tokens(lr.to(self._device)).float()
        out = self.ensemble(cond, num_samples, steps, seed=seed, variance=variance, return_samples=return_samples,
                            member_budget=member_budget, progress=progress, image_ids=ids.tolist(), amp=amp,
                            sampler=sampler)
        if self.config.spread != 1.0:  # calibrated on validation fields (calibrate_spread)
            k = float(self.config.spread)
            out.variance = out.variance * k**2
            if out.samples is not None:
                out.samples = out.mean + k * (out.samples - out.mean)
        if self.mean_model is not None:  # the ensemble of residuals plus μ(lr): the variance is the residual's
            prediction = self.mean_model.predict(lr.to(self._device)).to(out.mean)
            out.mean = out.mean + prediction
            if out.samples is not None:
                out.samples = out.samples + prediction
        if self.config.bounds is not None:  # blocks whose mean sits at a bound are certain
            out.mean, out.variance, out.samples = bounds_.apply(out.mean, lr, self.config.bounds, self.config.scale,
                                                                out.variance, out.samples)
        if distributed:
            gather = distributed_.all_gather_rows
            out.mean, out.variance = gather(out.mean), gather(out.variance)
            if return_samples:
                out.samples = gather(out.samples.transpose(0, 1)).transpose(0, 1)
                out.tokens = gather(out.tokens.transpose(0, 1)).transpose(0, 1)
        return out

    def calibrate_spread(self, lr_val: torch.Tensor, hr_val: torch.Tensor, num_samples: int = 16,
                         seed: int | None = None, limits=(0.5, 2.0), method: str = "members",
                         mode_limits=(0.25, 4.0), shape: str = "validation",
                         bands: int = error_shape.ERROR_BANDS) -> float:
        """Sets ``config.spread`` from the validation fields ``[N, C, H, W]`` and returns it, clipped
        to ``limits``: ``method`` ``"members"`` (the default) is the factor for the members'
        deviations that minimises their fair CRPS (``metrics.members_spread``: the members are
        what a user draws); ``"crps"`` minimises the validation CRPS of ``N(m, k² σ²)`` and
        ``"moments"`` matches the mean squared error (``metrics.calibrated_spread``). ``"modes"`` first sets ``config.mode_spread``, one factor per POD mode
        minimising the CRPS of that mode's validation tokens (clipped to ``mode_limits``; where the
        model's spread is wrong by a different amount in each mode), then ``k`` by CRPS on top.
        ``shape`` ``"validation"`` (the default) also sets ``config.error_quantiles``, the quantiles
        of the validation errors over the calibrated std (``podiff.error_shape``: the intervals
        and CRPS of a heavier-tailed predictive than the Gaussian), one shape for each of ``bands``
        equal-count bands of the predicted mean (``config.error_band_edges``; ``bands=1``: one
        shape); ``"gaussian"`` clears them.
        The ensemble is drawn with ``spread = 1`` (and no per-mode factors)."""
        methods = ("members", "modes") + metrics.SPREAD_METHODS
        if method not in methods:
            raise ValueError(f"method must be one of {methods}; got {method!r}")
        if shape not in error_shape.ERROR_SHAPES:
            raise ValueError(f"shape must be one of {error_shape.ERROR_SHAPES}; got {shape!r}")
        metrics.check_spread_limits(limits)
        metrics.check_spread_limits(mode_limits, "mode_limits")
        if int(bands) != bands or bands < 1:
            raise ValueError(f"bands must be an integer >= 1; got {bands!r}")
        self.config.spread, self.config.mode_spread, self.config.error_quantiles = 1.0, None, None
        self.config.error_band_edges = None
        out = self.sample(lr_val, num_samples=num_samples, seed=seed, return_samples=method in ("members", "modes"))
        if method == "modes":
            truth = self.target_tokens(hr_val.to(self._device), lr_val.to(self._device)).to(out.tokens)
            valid = self.pod.valid_locations().to(truth.device).view(1, -1).expand(truth.shape[:2])
            mean, var = out.tokens.mean(0), out.tokens.var(0)
            self.config.mode_spread = [metrics.calibrated_spread(mean[..., j], var[..., j], truth[..., j], "crps",
                                                                 mode_limits, mask=valid)
                                       for j in range(truth.shape[-1])]
            out = self.sample(lr_val, num_samples=num_samples, seed=seed)
        truth = hr_val.to(out.mean)
        if method == "members":
            k = metrics.members_spread(out.samples, truth, limits)
        else:
            k = metrics.calibrated_spread(out.mean, out.variance, truth, "moments" if method == "moments" else "crps",
                                          limits)
        if shape == "validation":
            self.config.error_quantiles, self.config.error_band_edges = error_shape.fit_error_shape(
                out.mean, k**2 * out.variance, truth, bands)
        self.config.spread = k
        return k

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | Path) -> None:
        """``config.json``, ``pod.safetensors`` and ``weights.safetensors`` (live and EMA), atomically."""
        save_pipeline(self, directory)

    @classmethod
    def load(cls, directory: str | Path, device=None) -> "PODiffPipeline":
        """Reads a folder written by ``save`` onto ``device`` (default CPU); bad or missing files give
        a clear error."""
        return load_pipeline(cls, directory, device)

    def num_parameters(self) -> int:
        return self.denoiser.num_parameters() + sum(p.numel() for p in self.schedule.parameters())

    def describe(self) -> str:
        return (f"PODiffPipeline: POD {self.pod}, denoiser {type(self.denoiser).__name__} "
                f"{self.num_parameters():,} parameters, schedule {self.config.schedule}, "
                f"prediction {self.config.prediction}, sampler {self.config.sampler}, device {self.device}"
                + (f", residual over {self.mean_model.ridge.describe()}" if self.mean_model is not None else ""))


__all__ = ["PipelineConfig", "PODiffPipeline", "SampleOutput", "Trainer", "upsample"]
