"""``PODiffPipeline``: a fitted model of conditional super-resolution by diffusion over POD tokens,
with closed-form pixel uncertainty. It samples, moves between devices, saves and loads; the code
that produces its state from fields is ``podiff.fitting``.

>>> import torch
>>> from podiff.fitting import fit
>>> hr = torch.randn(12, 1, 16, 16).cumsum(-1) / 4                 # [N, C, H, W]
>>> lr = torch.nn.functional.avg_pool2d(hr, 4)                     # [N, C, h, w]
>>> pipe = PODiffPipeline(PipelineConfig(scale=4, patch_size=4, rank=8, train_steps=5, batch_size=4,
...                                      residual="none", denoiser=dict(width=32, depth=1, heads=2)))
>>> history = fit(pipe, lr[:10], hr[:10], progress=False)         # device="cuda" on a GPU
>>> out = pipe.sample(lr[10:], num_samples=4, steps=3, seed=0)
>>> out.mean.shape, out.variance.shape                           # [B, C, H, W] each, NaN on masked pixels
(torch.Size([2, 1, 16, 16]), torch.Size([2, 1, 16, 16]))

State (what fitting produces): the data scaling (``offset``, ``data_scale``); a fitted
``PatchPOD`` of the standardised high-resolution fields; a residual model's ``mean_model``; the
denoiser, schedule and EMA weights; ``noise_correlation`` (the grid-correlated noise, None: white);
``calibration`` (``model.state.Calibration``: spread and predictive shape); ``training``
(``diffusion.training.TrainingRecord``: steps, losses, best step); ``pod_choice``. The config
is the caller's, copied.

Sampling: condition tokens are the POD encoding of the bicubic-upsampled low-resolution field
(or of the mean model's anomaly); all ``M`` members of all images run as one batched chain
(chunked to ``member_budget`` tokens), then ``ensemble_moments`` + ``decode_moments`` give the
pixel mean and variance (block by default) without decoding the members, and undo the data
scaling (offset, scale²). ``save``/``load``: ``model.persistence``.

Device: everything (weights, EMA, POD basis, data scaling, tokens, noise) lives on
``pipe.device``; ``to(device)`` and ``load(..., device=...)`` choose it. Weights are initialised
on the CPU from ``config.seed`` and moved, and noise is drawn from CPU generators and moved, so a
CPU and a CUDA run start from the same weights and the same noise; their results agree to float
rounding, not bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import podiff_kernels as pk
from podiff.config import PipelineConfig
from podiff.core import distributed as distributed_
from podiff.core.progress import progress_bar
from podiff.core.sample_output import SampleOutput
from podiff.data import bounds as bounds_
from podiff.data.datasets import block_average
from podiff.data.resample import upsample
from podiff.data.standardise import standardise, unstandardise
from podiff.diffusion.denoiser import DenoiserConfig, MLPDenoiser, PODDenoiser
from podiff.diffusion.sampling import DiffusionScheduler, RowNoise, member_seed
from podiff.diffusion.schedules import make_schedule
from podiff.diffusion.token_noise import GridCorrelation
from podiff.diffusion.training import TrainingRecord, autocast
from podiff.latent.pod import PatchPOD
from podiff.latent.windows import TrainingWindows, crop_field
from podiff.mean.mean_model import MeanModel
from podiff.model.domain import domain_limits, for_domain, valid_pixels_of
from podiff.model.member_grids import on_member_grids
from podiff.model.persistence import load_pipeline, save_pipeline
from podiff.model.state import Calibration


def check_pair(lr: torch.Tensor, hr: torch.Tensor | None, scale: int, covariates: int = 0) -> None:
    """``lr [N, C + covariates, h, w]`` and ``hr [N, C, h·scale, w·scale]`` (None: ``lr`` alone), finite or NaN."""
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
    if lr.shape[1] != hr.shape[1] + covariates:
        if covariates:
            raise ValueError(f"lr must have hr's {hr.shape[1]} channel(s) and the {covariates} covariate channels; "
                             f"got {lr.shape[1]}")
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


class PODiffPipeline:
    """Train, sample and save a Patch-PODiff-ViT model (see the module docstring).

    Args:
        config: the model and its training (``PipelineConfig``).
        pod: a fitted ``PatchPOD`` (or ``GlobalPOD``) to use instead of fitting one; an unfitted
            one is fitted by ``build``.
        device: where the model lives and runs (default CPU; ``to`` moves it).
    """

    def __init__(self, config: PipelineConfig | None = None, pod: PatchPOD | None = None, device=None):
        self.config = copy.deepcopy(config) if config is not None else PipelineConfig()
        self.pod = pod
        self.denoiser: nn.Module | None = None
        self.ema: nn.Module | None = None
        self.schedule = None
        self.offset = self.data_scale = None  # per channel, [C]
        self.image_size: tuple[int, int] | None = None
        self.pod_choice: dict | None = None  # how the POD was chosen (pod_selection), when it was
        self.mean_model: MeanModel | None = None  # a residual model: μ(lr), the diffusion models x − μ
        self.noise_correlation: dict | None = None  # the grid-correlated noise's state (token_noise)
        self.covariate_offset = self.covariate_scale = None  # per covariate channel, [K]
        self.calibration = Calibration()
        self.training = TrainingRecord()
        self._device = torch.device(device if device is not None else "cpu")

    # ------------------------------------------------------------------ device

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device) -> PODiffPipeline:
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
        if self.covariate_offset is not None:
            self.covariate_offset = self.covariate_offset.to(device)
            self.covariate_scale = self.covariate_scale.to(device)
        self._device = device
        return self

    # ------------------------------------------------------------------ data <-> tokens

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return standardise(x, self.offset, self.data_scale)

    @property
    def num_covariates(self) -> int:
        return len(self.config.covariates)

    def target_input(self, lr: torch.Tensor) -> torch.Tensor:
        """The target's own coarse channels of an input ``lr [B, C + K, h, w]``: ``[B, C, h, w]``."""
        return lr[:, : lr.shape[1] - self.num_covariates]

    def condition_tokens(self, lr: torch.Tensor, mu: torch.Tensor | None = None) -> torch.Tensor:
        """``lr [B, C + K, h, w]`` -> standardised condition tokens ``[B, L, r (+ F)]``: the bicubic-upsampled
        field, masked where the high-resolution fields are (so a coastal patch is encoded from its
        ocean pixels only, as its target is); with covariates, each token's covariate features
        (``covariate_tokens``, ``F`` of them) after its ``r`` coefficients."""
        if self.mean_model is not None:  # residual: μ(lr)'s anomaly, unit RMS per mode
            mu = self.mean_model.predict(lr) if mu is None else mu
            cond = self.condition_coefficients(mu) / self.mean_model.cond_scale.to(lr)
        else:
            up = upsample(self.standardise(self.target_input(lr)), self.image_size)
            cond = self.pod.encode(up.masked_fill(~self.pod.valid_pixels.to(up.device), float("nan")))
        if self.num_covariates:
            cond = torch.cat([cond, self.covariate_tokens(lr).to(cond)], -1)
        return cond

    def covariate_cells(self) -> int:
        """Input cells per token side whose covariates a token sees: ``patch_size / scale`` when the
        patch covers whole input cells, else 1 (the covariates averaged or repeated onto the token grid)."""
        p, s = self.config.patch_size, self.config.scale
        return p // s if p >= s and p % s == 0 else 1

    def covariate_tokens(self, lr: torch.Tensor) -> torch.Tensor:
        """The covariate channels of ``lr [B, C + K, h, w]``, standardised (NaN: 0, the mean), on the
        token grid: ``[B, L, K·q²]`` with ``q = covariate_cells()`` input cells per token side."""
        cov = self._standardised_covariates(lr)
        q = self.covariate_cells()
        nH, nW = self.pod.grid
        size = (nH * q, nW * q)
        if tuple(cov.shape[-2:]) != size:
            if size[0] <= cov.shape[-2] and size[1] <= cov.shape[-1]:
                cov = F.adaptive_avg_pool2d(cov, size)
            else:
                cov = F.interpolate(cov, size=size, mode="nearest")
        return F.unfold(cov, q, stride=q).transpose(1, 2)

    def _standardised_covariates(self, lr: torch.Tensor) -> torch.Tensor:
        """``lr``'s covariate channels ``[B, K, h, w]``, standardised, NaN as 0 (their mean)."""
        cov = lr[:, lr.shape[1] - self.num_covariates :].float()
        cov = (cov - self.covariate_offset.view(1, -1, 1, 1).to(cov)) / self.covariate_scale.view(1, -1, 1, 1).to(cov)
        return torch.nan_to_num(cov, nan=0.0)

    def condition_coefficients(self, mu: torch.Tensor) -> torch.Tensor:
        return self.pod.encode(self._condition_field(mu), standardized=False)

    def _condition_field(self, mu: torch.Tensor) -> torch.Tensor:
        """The residual model's condition as a field (in data-scale units; NaN where never valid)."""
        if self.config.resolved_condition == "detail":  # what μ adds below the input grid: blind to level and trend
            field = mu - upsample(block_average(mu, self.config.scale), self.image_size)
        else:
            field = self.mean_model.condition_field(mu)
        field = field / self.data_scale.view(1, -1, 1, 1).to(mu)
        return field.masked_fill(~self.pod.valid_pixels.to(field.device), float("nan"))

    # ------------------------------------------------------------------ training windows: shifted grids, crops

    def training_windows(self) -> TrainingWindows:
        """The windows of the patch grid the denoiser trains on (``latent.windows``): shifted grids
        (``config.grid_shifts``) and crops of ``config.resolved_crop(grid)`` tokens a side. Only the fitted grid for
        a local basis (its bases belong to their locations), overlapping patches or a global POD
        (one token)."""
        pod, cfg = self.pod, self.config
        usable = isinstance(pod, PatchPOD) and pod.fitted and not pod.local and pod.stride == pod.patch_size
        if not usable:
            return TrainingWindows((1, 1), 1, (1, 1))
        return TrainingWindows(tuple(pod.grid), pod.patch_size, tuple(self.image_size),
                               shifts=bool(cfg.grid_shifts), crop=cfg.resolved_crop(pod.grid))

    def window_tokens(self, hr: torch.Tensor, lr: torch.Tensor, mu: torch.Tensor | None,
                      window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and condition tokens ``[B, L', r]``, ``[B, L', r_c]`` of the fields' crop at ``window``
        (its top-left pixel; ``training_windows().geometry(window)`` places them): the tokens
        ``target_tokens`` and ``condition_tokens`` give for the fitted grid, of that crop (the
        pixels past the field's edge NaN: gappy-encoded, as on a member grid).
        ``mu``: the mean model's prediction of ``lr`` (a residual model; its out-of-fold one for its
        fields)."""
        windows = self.training_windows()
        if windows.is_fitted(window):
            return self.target_tokens(hr, lr, mu).float(), self.condition_tokens(lr, mu).float()
        rows, cols = windows.crop_slices(window)
        if self.mean_model is not None:
            mu = self.mean_model.predict(lr) if mu is None else mu
            hr = hr - mu
        x0 = self.pod.encode(crop_field(self.standardise(hr), rows, cols))
        return x0.float(), self.window_condition(lr, mu, rows, cols)

    def window_condition(self, lr: torch.Tensor, mu: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor:
        """Condition tokens ``[B, L', r_c]`` of the pixels ``rows, cols`` of the fields (whole
        patches; NaN past the field's edges): ``condition_tokens`` on that window's grid."""
        if self.mean_model is not None:
            mu = self.mean_model.predict(lr) if mu is None else mu
            cond = self.pod.encode(crop_field(self._condition_field(mu), rows, cols), standardized=False)
            cond = cond / self.mean_model.cond_scale.to(cond)
        else:
            up = upsample(self.standardise(self.target_input(lr)), self.image_size)
            up = up.masked_fill(~self.pod.valid_pixels.to(up.device), float("nan"))
            cond = self.pod.encode(crop_field(up, rows, cols))
        if self.num_covariates:
            cond = torch.cat([cond, self._window_covariates(lr, rows, cols).to(cond)], -1)
        return cond.float()

    def _window_covariates(self, lr: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """The covariate features of a window's tokens: ``covariate_tokens``' average of the input
        cells under each token (or each of its ``q × q`` parts), over its pixels inside the field."""
        s, p, q = self.config.scale, self.pod.patch_size, self.covariate_cells()
        r0, c0 = rows.start // s, cols.start // s  # the coarse cells under the window (NaN outside the field)
        cells = crop_field(self._standardised_covariates(lr), slice(r0, -(-rows.stop // s)),
                           slice(c0, -(-cols.stop // s)))
        pixels = cells.repeat_interleave(s, -2).repeat_interleave(s, -1)
        pixels = pixels[..., rows.start - r0 * s : rows.stop - r0 * s, cols.start - c0 * s : cols.stop - c0 * s]
        inside = (~torch.isnan(pixels)).to(pixels.dtype)
        k = p // q  # pixels per part of a token
        count = F.avg_pool2d(inside, k)
        mean = F.avg_pool2d(torch.nan_to_num(pixels), k) / count.clamp_min(1e-12)
        mean = mean.masked_fill(count == 0, 0.0)  # a part wholly outside: the covariates' mean
        return F.unfold(mean, q, stride=q).transpose(1, 2)

    def target_tokens(self, hr: torch.Tensor, lr: torch.Tensor | None = None,
                      mu: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised tokens of ``hr`` (of its residual ``hr − μ(lr)`` when residual; ``lr`` or
        ``μ``'s ``prediction`` needed then)."""
        if self.mean_model is not None:
            if lr is None and mu is None:
                raise ValueError("a residual pipeline's target tokens need lr (the target is hr − μ(lr))")
            hr = hr - (self.mean_model.predict(lr) if mu is None else mu)
        return self.pod.encode(self.standardise(hr))

    # ------------------------------------------------------------------ building

    def build_model(self, denoiser_config: dict | None = None) -> None:
        """Creates the denoiser, schedule and EMA for the POD's rank and grid, initialised on the
        CPU from ``config.seed`` (so every device starts from the same weights), on ``self.device``."""
        cfg = self.config
        if denoiser_config is None:
            noise_input = "per_token" if cfg.schedule == "learned" else "time"
            extra = self.num_covariates * self.covariate_cells() ** 2
            dcfg = DenoiserConfig.preset(cfg.preset, rank=self.pod.rank, grid=self.pod.grid, noise_input=noise_input,
                                         **({"cond_rank": self.pod.rank + extra} if extra else {}),
                                         **cfg.denoiser_settings(self.pod.grid))
        else:
            dcfg = DenoiserConfig(**denoiser_config)
        torch.manual_seed(cfg.seed)
        self.denoiser = (PODDenoiser if cfg.denoiser_kind == "vit" else MLPDenoiser)(dcfg)
        self.schedule = make_schedule(cfg.schedule, rank=dcfg.rank, prediction_type=cfg.prediction_type)
        self.ema = copy.deepcopy(nn.ModuleList([self.denoiser, self.schedule])).requires_grad_(False)
        for module in (self.denoiser, self.schedule, self.ema):
            module.to(self._device)

    @property
    def noise_input(self) -> str:
        return self.denoiser.config.noise_input

    # ------------------------------------------------------------------ training

    @property
    def token_noise(self) -> GridCorrelation | None:
        """The grid-correlated noise map (``noise_correlation``), or None for white noise."""
        state = self.noise_correlation
        if state is None:
            return None
        if getattr(self, "_token_noise_state", None) is not state:  # cached per fitted state
            self._token_noise, self._token_noise_state = GridCorrelation.from_state(state), state
        return self._token_noise

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, num_samples: int, steps: int | None = None,
                      seed: int | None = None, member_budget: int = 1 << 20, use_ema: bool = True,
                      progress: bool = False, image_ids=None, amp: bool | None = None,
                      sampler: str | None = None, first_member: int = 0) -> torch.Tensor:
        """``M`` members for condition tokens ``[B, L, r_c]`` -> ``[M, B, L, r]``, in chunks of at most
        ``member_budget`` token values per call. ``sampler`` (None: ``config.sampler``) is one of
        ``podiff.diffusion.samplers.SAMPLERS``, e.g. ``"dpmsolver++"`` for few steps.

        Member ``m`` of image ``b`` draws its noise from its own CPU generator, seeded by
        ``(seed, image_ids[b], m)`` (``image_ids`` defaults to ``0..B-1``), moved to ``cond``'s
        device: the same seed gives the same samples whatever the chunking, the batch or the
        number of ranks, and the same noise on every device. ``amp``: bfloat16 autocast for the
        denoiser (None: ``config.amp`` on CUDA, off elsewhere); the sampler's updates stay float32.
        ``first_member``: the members are ``first_member ..`` of a larger ensemble (their seeds).
        """
        cfg = self.config
        denoiser, schedule = (self.ema[0], self.ema[1]) if use_ema else (self.denoiser, self.schedule)
        scheduler = DiffusionScheduler(schedule, cfg.prediction_type, sampler or cfg.sampler, cfg.eta)
        steps = cfg.sample_steps if steps is None else int(steps)
        amp = (cfg.amp and cond.device.type == "cuda") if amp is None else bool(amp)
        B, L, rc = cond.shape
        r = denoiser.config.rank  # the tokens' modes; the condition may carry covariate features beyond them
        seed = cfg.seed if seed is None else int(seed)
        ids = list(range(B)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != B:
            raise ValueError(f"image_ids must hold one id per image ({B}); got {len(ids)}")
        # Antithetic pairs (config.antithetic): member 2k+1 runs the mirror chain of member 2k (the
        # same noise, negated), which cancels the ensemble mean's leading Monte-Carlo error; each
        # member is still a sample of the model.
        pair = 2 if cfg.antithetic else 1
        members = range(int(first_member), int(first_member) + num_samples)
        seeds = [member_seed(seed, i, m // pair) for m in members for i in ids]  # member-major, like flat
        signs = [(-1.0 if cfg.antithetic and m % 2 else 1.0) for m in members for _ in ids]
        flat = cond[None].expand(num_samples, B, L, rc).reshape(num_samples * B, L, rc)
        chunk = max(1, member_budget // max(1, L * rc))
        colour = self.token_noise
        grid = tuple(self.pod.grid) if hasattr(self.pod, "grid") else (1, 1)
        origin = getattr(self, "grid_origin", (0.0, 0.0))  # a member grid's place (member_grids)
        geometry = (None if grid == tuple(denoiser.config.grid) and origin == (0.0, 0.0)  # another domain's grid
                    else {"grid": grid, "origin": origin})
        if colour is not None and geometry is not None:
            colour = colour.on_grid(grid)

        def noise_for(rows: slice):
            white = RowNoise(seeds[rows], cond.device, signs[rows])
            return white if colour is None else (lambda shape, dtype: colour(white(shape, dtype)))

        was_training = denoiser.training
        denoiser.eval()
        starts = range(0, flat.shape[0], chunk)
        with autocast(cond.device, amp):
            out = [scheduler.sample(denoiser, flat[i : i + chunk], steps, noise_input=self.noise_input,
                                    noise=noise_for(slice(i, i + chunk)), geometry=geometry)
                   for i in progress_bar(starts, enabled=progress, desc="sample", unit="chunk")]
        denoiser.train(was_training)
        return torch.cat(out).view(num_samples, B, L, r)

    @torch.no_grad()
    def ensemble(self, cond: torch.Tensor, num_samples: int, steps: int | None = None, *, seed: int | None = None,
                 variance: str = "block", return_samples: bool = False, member_budget: int = 1 << 20,
                 progress: bool = False, image_ids=None, amp: bool | None = None,
                 sampler: str | None = None, first_member: int = 0) -> SampleOutput:
        """The ensemble from condition tokens ``[B, L, r]`` (``condition_tokens(lr)``): sampling,
        ensemble moments, closed-form pixel moments, data units. ``sample`` checks its input and
        calls this; no device value is read here, so it also runs under ``FakeTensorMode``."""
        tokens = self.sample_tokens(cond, int(num_samples), steps, seed, member_budget, progress=progress,
                                    image_ids=image_ids, amp=amp, sampler=sampler, first_member=first_member)
        if self.calibration.mode_spread is not None:  # per-mode spread (calibrate_spread(method="modes"))
            factors = self.calibration.mode_spread
            if len(factors) != tokens.shape[-1]:
                raise ValueError(f"calibration.mode_spread holds {len(factors)} factors; the POD has "
                                 f"{tokens.shape[-1]} modes")
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
        """Ensemble super-resolution of ``lr [B, C, h, w]`` (any device; moved to ``self.device``):
        the trained input size, or any size for a model of any domain (``for_domain``; another
        model names what binds it to its grid).

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
            raise RuntimeError("this pipeline is not trained; call podiff.fitting.fit(pipe, lr, hr) or "
                               "PODiffPipeline.load(dir)")
        if variance not in ("block", "diagonal"):
            raise ValueError(f"variance must be 'block' or 'diagonal'; got {variance!r}")
        if int(num_samples) < 2:
            raise ValueError(f"num_samples must be >= 2 for a variance; got {num_samples}")
        check_pair(lr, None, self.config.scale)
        s = self.config.scale
        expected = (self.image_size[0] // s, self.image_size[1] // s)
        channels = self.offset.numel() + self.num_covariates
        if lr.shape[1] != channels:
            also = f" ({self.offset.numel()} of the target and the covariates {self.config.covariates})" \
                if self.num_covariates else ""
            size = f"{expected[0]}, {expected[1]}] (the trained size" if self.domain_limits() else "h, w] (any size"
            raise ValueError(f"lr must be [B, {channels}, {size}{also}); got {tuple(lr.shape)}")
        if tuple(lr.shape[-2:]) != expected:  # another domain: the model's view of it, or a one-line error
            try:
                view = for_domain(self, (lr.shape[-2] * s, lr.shape[-1] * s),
                                  valid_pixels_of(lr, self.offset.numel(), s))
            except ValueError as err:
                raise ValueError(f"lr is {tuple(lr.shape[-2:])} cells, not the trained {expected}, and {err}") from None
            return view.sample(lr, num_samples, steps, seed=seed, variance=variance, return_samples=return_samples,
                               member_budget=member_budget, progress=progress, image_ids=image_ids,
                               distributed=distributed, amp=amp, sampler=sampler)
        ids = torch.arange(lr.shape[0]) if image_ids is None else torch.as_tensor(image_ids).cpu()
        if ids.shape != (lr.shape[0],):
            raise ValueError(f"image_ids must hold one id per image ({lr.shape[0]}); got shape {tuple(ids.shape)}")
        distributed = distributed_.is_active() if distributed is None else bool(distributed)
        if distributed:
            rows = distributed_.shard(lr.shape[0], *distributed_.rank_world())
            lr, ids = lr[rows], ids[rows]
        options = dict(seed=seed, variance=variance, return_samples=return_samples, member_budget=member_budget,
                       progress=progress, image_ids=ids.tolist(), amp=amp, sampler=sampler)
        on_device = lr.to(self._device)
        mu = self.mean_model.predict(on_device) if self.mean_model is not None else None  # once: condition and mean
        if self.config.member_grids > 1:
            out = on_member_grids(self, on_device, mu, int(num_samples), steps, **options)
        else:
            out = self.ensemble(self.condition_tokens(on_device, mu).float(), num_samples, steps, **options)
        if self.calibration.spread != 1.0:  # calibrated on validation fields (calibrate_spread)
            out.scale_spread(self.calibration.spread)
        if mu is not None:  # the ensemble of residuals plus μ(lr): the variance is the residual's
            mu = mu.to(out.mean)
            out.mean = out.mean + mu
            if out.samples is not None:
                out.samples = out.samples + mu
        if self.config.bounds is not None:  # blocks whose mean sits at a bound are certain
            out.mean, out.variance, out.samples = bounds_.apply(out.mean, self.target_input(lr), self.config.bounds,
                                                                self.config.scale, out.variance, out.samples)
        if distributed:
            gather = distributed_.all_gather_rows
            out.mean, out.variance = gather(out.mean), gather(out.variance)
            if return_samples:
                out.samples = gather(out.samples.transpose(0, 1)).transpose(0, 1)
                if out.tokens is not None:  # none from several member grids
                    out.tokens = gather(out.tokens.transpose(0, 1)).transpose(0, 1)
        return out

    def for_domain(self, image_size, valid_pixels: torch.Tensor | None = None) -> PODiffPipeline:
        """This model on fields of ``image_size = (H, W)`` (``model.domain.for_domain``): a view
        sharing every weight; ``sample`` takes it itself for an input of another size."""
        return for_domain(self, image_size, valid_pixels)

    def domain_limits(self) -> list[str]:
        """What binds this model to its training grid (``model.domain.domain_limits``; empty: none)."""
        return domain_limits(self)

    def save(self, directory: str | Path) -> None:
        """``config.json``, ``pod.safetensors`` and ``weights.safetensors`` (live and EMA), atomically."""
        save_pipeline(self, directory)

    @classmethod
    def load(cls, directory: str | Path, device=None) -> PODiffPipeline:
        """Reads a folder written by ``save`` onto ``device`` (default CPU); bad or missing files give
        a clear error."""
        return load_pipeline(cls, directory, device)

    def num_parameters(self) -> int:
        return self.denoiser.num_parameters() + sum(p.numel() for p in self.schedule.parameters())

    def describe(self) -> str:
        return (f"PODiffPipeline: POD {self.pod}, denoiser {type(self.denoiser).__name__} "
                f"{self.num_parameters():,} parameters, schedule {self.config.schedule}, "
                f"prediction_type {self.config.prediction_type}, sampler {self.config.sampler}, device {self.device}"
                + (f", residual over {self.mean_model.describe()}" if self.mean_model is not None else ""))


__all__ = ["PODiffPipeline", "check_pair"]
