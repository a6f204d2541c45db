"""``PODiffPipeline``: conditional super-resolution by diffusion over POD tokens, with
closed-form pixel uncertainty.

>>> pipe = PODiffPipeline(PipelineConfig(scale=4, patch_size=4, rank=8, train_steps=200))
>>> history = pipe.fit(lr_train, hr_train, device="cuda")       # [N, C, h, w], [N, C, 4h, 4w]
>>> out = pipe.sample(lr_test, num_samples=16, steps=20, seed=0)
>>> out.mean.shape, out.variance.shape                           # [B, C, H, W] each, NaN on masked pixels

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import podiff_kernels as pk

from . import distributed as distributed_
from .config import PipelineConfig
from .denoiser import DenoiserConfig, MLPDenoiser, PODDenoiser
from .persistence import load_pipeline, save_pipeline
from .pod import PatchPOD, atomic_write  # noqa: F401  (atomic_write: re-exported for callers)
from .sampling import DiffusionScheduler, RowNoise, member_seed
from .schedules import make_schedule
from .standardise import fit_scaling, standardise, unstandardise
from .training import Trainer, autocast, diffusion_loss, draw_noise


@dataclass
class SampleOutput:
    """``mean`` and ``variance`` ``[B, C, H, W]`` (data units; NaN on masked pixels);
    ``samples`` ``[M, B, C, H, W]`` when requested; ``tokens`` ``[M, B, L, r]`` likewise."""

    mean: torch.Tensor
    variance: torch.Tensor
    samples: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


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
        self._device = device
        return self

    # ------------------------------------------------------------------ data <-> tokens

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return standardise(x, self.offset, self.data_scale)

    def condition_tokens(self, lr: torch.Tensor) -> torch.Tensor:
        """``lr [B, C, h, w]`` -> standardised condition tokens ``[B, L, r]``: the bicubic-upsampled
        field, masked where the high-resolution fields are (so a coastal patch is encoded from its
        ocean pixels only, as its target is)."""
        up = upsample(self._standardise(lr), self.image_size)
        return self.pod.encode(up.masked_fill(~self.pod.valid_pixels.to(up.device), float("nan")))

    def target_tokens(self, hr: torch.Tensor) -> torch.Tensor:
        return self.pod.encode(self._standardise(hr))

    # ------------------------------------------------------------------ building

    def build(self, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None, *,
              progress: bool = False, distributed: bool = False) -> "PODiffPipeline":
        """Fits the data scaling and the POD (unless a fitted one was given) on ``hr``, then builds
        the denoiser, schedule and EMA copy; no training (``lr`` is only checked against ``hr``).
        The data are moved to ``self.device`` first: the fits and the model all run there."""
        lr, hr, mask = self._checked_on_device(lr, hr, mask)
        return self._build(hr, mask, progress, distributed)

    def _checked_on_device(self, lr, hr, mask):
        """``lr, hr, mask`` on ``self.device``, checked once for ``build`` and ``fit``."""
        lr, hr = lr.to(self._device), hr.to(self._device)
        mask = mask.to(self._device) if mask is not None else None
        _check_pair(lr, hr, self.config.scale)
        return lr, hr, mask

    def _build(self, hr: torch.Tensor, mask, progress: bool, distributed: bool) -> "PODiffPipeline":
        valid = ~torch.isnan(hr) if mask is None else (~torch.isnan(hr) & mask)
        self.offset, self.data_scale = fit_scaling(hr, valid, distributed)
        self.image_size = tuple(hr.shape[-2:])
        cfg = self.config
        if self.pod is None or not self.pod.fitted:  # a given unfitted POD (e.g. GlobalPOD) is fitted here
            if self.pod is None:
                self.pod = PatchPOD(cfg.patch_size, cfg.stride, rank=cfg.rank, energy=cfg.energy, basis=cfg.basis)
            hr_std = self._standardise(hr)
            if mask is not None:
                hr_std = hr_std.masked_fill(~mask, float("nan"))
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
        return draw_noise(x0.shape, schedule.t_max(self.config.prediction), generator, x0.device, x0.dtype)

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
            distributed: bool | None = None, device=None, amp: bool | None = None) -> list[float]:
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

        Returns:
            The loss history (one value per step; the global-batch loss when distributed).
        """
        cfg = self.config
        if device is not None:
            self.to(device)
        lr, hr, mask = self._checked_on_device(lr, hr, mask)
        distributed = distributed_.is_active() if distributed is None else bool(distributed)
        # On the data's device: nccl reduces CUDA tensors only.
        total = (int(distributed_.all_sum(torch.tensor(hr.shape[0], device=hr.device)).item()) if distributed
                 else hr.shape[0])
        if total < 2:
            raise ValueError(f"training needs at least two samples; got {total}")
        if self.denoiser is None:
            rank = distributed_.rank_world()[0] if distributed else 0
            self._build(hr, mask, progress and rank == 0, distributed)
        steps = cfg.train_steps if steps is None else int(steps)
        if steps < 0:
            raise ValueError(f"steps must be >= 0; got {steps}")
        with torch.no_grad():
            x0_all = distributed_.all_gather_rows(self.target_tokens(hr).float())
            cond_all = distributed_.all_gather_rows(self.condition_tokens(lr).float())
        trainer = Trainer(self, amp=amp, distributed=distributed)
        return trainer.fit(x0_all, cond_all, steps, progress=progress, checkpoint=checkpoint,
                           checkpoint_every=checkpoint_every, resume=resume, log_every=log_every)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, num_samples: int, steps: int | None = None,
                      seed: int | None = None, member_budget: int = 1 << 20, use_ema: bool = True,
                      progress: bool = False, image_ids=None, amp: bool | None = None) -> torch.Tensor:
        """``M`` members for condition tokens ``[B, L, r]`` -> ``[M, B, L, r]``, in chunks of at most
        ``member_budget`` token values per call.

        Member ``m`` of image ``b`` draws its noise from its own CPU generator, seeded by
        ``(seed, image_ids[b], m)`` (``image_ids`` defaults to ``0..B-1``), moved to ``cond``'s
        device: the same seed gives the same samples whatever the chunking, the batch or the
        number of ranks, and the same noise on every device. ``amp``: bfloat16 autocast for the
        denoiser (None: ``config.amp`` on CUDA, off elsewhere); the sampler's updates stay float32.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        denoiser, schedule = (self.ema[0], self.ema[1]) if use_ema else (self.denoiser, self.schedule)
        scheduler = DiffusionScheduler(schedule, cfg.prediction, cfg.sampler, cfg.eta)
        steps = cfg.sample_steps if steps is None else int(steps)
        amp = (cfg.amp and cond.device.type == "cuda") if amp is None else bool(amp)
        B, L, r = cond.shape
        seed = cfg.seed if seed is None else int(seed)
        ids = list(range(B)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != B:
            raise ValueError(f"image_ids must hold one id per image ({B}); got {len(ids)}")
        seeds = [member_seed(seed, i, m) for m in range(num_samples) for i in ids]  # member-major, like flat
        flat = cond[None].expand(num_samples, B, L, r).reshape(num_samples * B, L, r)
        chunk = max(1, member_budget // max(1, L * r))
        was_training = denoiser.training
        denoiser.eval()
        starts = range(0, flat.shape[0], chunk)
        with autocast(cond.device, amp):
            out = [scheduler.sample(denoiser, flat[i : i + chunk], steps, noise_input=self.noise_input,
                                    noise=RowNoise(seeds[i : i + chunk], cond.device))
                   for i in tqdm(starts, disable=not progress, desc="sample", unit="chunk")]
        denoiser.train(was_training)
        return torch.cat(out).view(num_samples, B, L, r)

    @torch.no_grad()
    def ensemble(self, cond: torch.Tensor, num_samples: int, steps: int | None = None, *, seed: int | None = None,
                 variance: str = "block", return_samples: bool = False, member_budget: int = 1 << 20,
                 progress: bool = False, image_ids=None, amp: bool | None = None) -> SampleOutput:
        """The ensemble from condition tokens ``[B, L, r]`` (``condition_tokens(lr)``): sampling,
        ensemble moments, closed-form pixel moments, data units. ``sample`` checks its input and
        calls this; no device value is read here, so it also runs under ``FakeTensorMode``."""
        tokens = self.sample_tokens(cond, int(num_samples), steps, seed, member_budget, progress=progress,
                                    image_ids=image_ids, amp=amp)
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
               distributed: bool | None = None, amp: bool | None = None) -> SampleOutput:
        """Ensemble super-resolution of ``lr [B, C, h, w]`` (any device; moved to ``self.device``).

        Returns ``SampleOutput`` with the pixel ``mean`` and ``variance`` ``[B, C, H, W]`` on
        ``self.device`` (analytic: ``variance="block"`` uses each token's r×r covariance,
        ``"diagonal"`` only its diagonal), and with ``return_samples`` the decoded members
        ``[M, B, C, H, W]``. ``image_ids`` name the images for seeding (default ``0..B-1``; see
        ``sample_tokens``): the same seed gives the same ensemble on the same device for any
        chunking or sharding; a CPU and a CUDA run share the noise and agree to float rounding.
        ``distributed`` (None: when a multi-rank group is initialised): every rank passes the
        same ``lr``, samples its contiguous share of the images and gets the gathered result,
        equal to the one-process result up to float rounding.
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
                            member_budget=member_budget, progress=progress, image_ids=ids.tolist(), amp=amp)
        if distributed:
            gather = distributed_.all_gather_rows
            out.mean, out.variance = gather(out.mean), gather(out.variance)
            if return_samples:
                out.samples = gather(out.samples.transpose(0, 1)).transpose(0, 1)
                out.tokens = gather(out.tokens.transpose(0, 1)).transpose(0, 1)
        return out

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
                f"prediction {self.config.prediction}, sampler {self.config.sampler}, device {self.device}")


__all__ = ["PipelineConfig", "PODiffPipeline", "SampleOutput", "Trainer", "upsample"]
