"""``PODiffPipeline``: conditional super-resolution by diffusion over POD tokens, with
closed-form pixel uncertainty.

>>> pipe = PODiffPipeline(PipelineConfig(scale=4, patch_size=4, rank=8, train_steps=200))
>>> history = pipe.fit(lr_train, hr_train)                     # [N, C, h, w], [N, C, 4h, 4w]
>>> out = pipe.sample(lr_test, num_samples=16, steps=20, seed=0)
>>> out.mean.shape, out.variance.shape                          # [B, C, H, W] each, NaN on masked pixels

Pieces: a fitted ``PatchPOD`` on the standardised high-resolution fields; condition tokens
= the POD encoding of the bicubic-upsampled low-resolution field; a ``PODDenoiser``
(or ``MLPDenoiser`` for one token) trained with ε- or v-prediction on standardised tokens;
a noise schedule (fixed or learned); a ``DiffusionScheduler``. Sampling runs all ``M``
members of all images as one batched chain (chunked to ``member_budget`` tokens), then
``ensemble_moments`` + ``decode_moments`` give the pixel mean and variance (block by
default) without decoding the members, and undo the data scaling (offset, scale²).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import podiff_kernels as pk

from . import distributed as distributed_
from .denoiser import DenoiserConfig, MLPDenoiser, PODDenoiser
from .pod import PatchPOD, atomic_write
from .sampling import DiffusionScheduler
from .schedules import make_schedule

FORMAT = "podiff.PODiffPipeline"
FORMAT_VERSION = 1


@dataclass
class PipelineConfig:
    """Everything that defines a model and its training; saved with it as JSON.

    POD: ``patch_size``, ``stride``, ``rank`` or ``energy``, ``basis``. Denoiser: ``preset``
    (``tiny``/``small``/``paper``) with ``denoiser`` overrides (``width``, ``depth``, …);
    ``denoiser_kind`` ``"vit"`` or ``"mlp"`` (one token only). Diffusion: ``schedule``
    (``cosine``/``linear``/``learned``), ``prediction`` (``v``/``epsilon``), ``sampler``
    (``ddim``/``ancestral``), ``eta``, ``sample_steps``. Training: ``train_steps``,
    ``batch_size``, ``lr``, ``warmup``, ``ema_decay``, ``grad_clip``, ``smoothness`` (weight of
    the learned schedule's regulariser), ``seed``, ``amp`` (bfloat16 autocast on CUDA).
    """

    scale: int = 4
    patch_size: int = 4
    stride: int | None = None
    rank: int | None = None
    energy: float | None = 0.999
    basis: str = "shared"
    preset: str = "tiny"
    denoiser: dict = field(default_factory=dict)
    denoiser_kind: str = "vit"
    schedule: str = "cosine"
    prediction: str = "v"
    sampler: str = "ddim"
    eta: float = 0.0
    sample_steps: int = 50
    train_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    smoothness: float = 1e-3
    seed: int = 0
    amp: bool = True

    def __post_init__(self):
        if int(self.scale) < 1:
            raise ValueError(f"scale must be a positive int; got {self.scale}")
        if self.denoiser_kind not in ("vit", "mlp"):
            raise ValueError(f"denoiser_kind must be 'vit' or 'mlp'; got {self.denoiser_kind!r}")
        if self.rank is not None:
            self.energy = None


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


def upsample(lr: torch.Tensor, size) -> torch.Tensor:
    """Bicubic upsampling to ``size``; masked (NaN) pixels filled first with the image's valid mean
    so they do not spread (they stay masked through the POD's mask)."""
    valid = ~torch.isnan(lr)
    fill = torch.where(valid, lr, 0.0).sum((-2, -1), keepdim=True) / valid.sum((-2, -1), keepdim=True).clamp_min(1)
    filled = torch.where(valid, lr, fill)
    return F.interpolate(filled, size=tuple(size), mode="bicubic", align_corners=False)


class _TrainingModule(nn.Module):
    """The denoiser and schedule with the training loss as ``forward`` (what DDP wraps)."""

    def __init__(self, pipe: "PODiffPipeline"):
        super().__init__()
        self.denoiser, self.schedule = pipe.denoiser, pipe.schedule
        self._loss = pipe.loss

    def forward(self, x0, cond, t, eps):
        return self._loss(x0, cond, denoiser=self.denoiser, schedule=self.schedule, noise=(t, eps))


class PODiffPipeline:
    """Train, sample and save a Patch-PODiff-ViT model (see the module docstring)."""

    def __init__(self, config: PipelineConfig | None = None, pod: PatchPOD | None = None):
        self.config = config or PipelineConfig()
        self.pod = pod
        self.denoiser: nn.Module | None = None
        self.ema: nn.Module | None = None
        self.schedule = None
        self.offset = self.data_scale = None  # per channel, [C]
        self.image_size: tuple[int, int] | None = None
        self.history: list[float] = []
        self.step_count = 0

    # ------------------------------------------------------------------ data <-> tokens

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset.view(1, -1, 1, 1).to(x)) / self.data_scale.view(1, -1, 1, 1).to(x)

    def condition_tokens(self, lr: torch.Tensor) -> torch.Tensor:
        """``lr [B, C, h, w]`` -> standardised condition tokens ``[B, L, r]``."""
        up = upsample(self._standardise(lr), self.image_size)
        return self.pod.encode(up)

    def target_tokens(self, hr: torch.Tensor) -> torch.Tensor:
        return self.pod.encode(self._standardise(hr))

    def _build(self, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None, progress: bool,
               distributed: bool = False) -> None:
        cfg = self.config
        valid = ~torch.isnan(hr) if mask is None else (~torch.isnan(hr) & mask)
        C = hr.shape[1]
        reduce = distributed_.all_sum if distributed else (lambda v: v)
        offsets, scales = [], []
        for c in range(C):
            # Two passes of float64 sums, reduced over ranks: the same offset and scale as one process.
            values = hr[:, c][valid[:, c]].double()
            count = reduce(torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device))
            if count < 2:
                raise ValueError(f"hr channel {c} has fewer than two valid pixels")
            mean = reduce(values.sum()) / count
            var = reduce((values - mean).pow(2).sum()) / (count - 1)
            offsets.append(mean.cpu())
            scales.append(var.sqrt().clamp_min(1e-12).cpu())
        self.offset, self.data_scale = torch.stack(offsets).float(), torch.stack(scales).float()
        self.image_size = tuple(hr.shape[-2:])
        if self.pod is None or not self.pod.fitted:  # a given unfitted POD (e.g. GlobalPOD) is fitted here
            if self.pod is None:
                self.pod = PatchPOD(cfg.patch_size, cfg.stride, rank=cfg.rank, energy=cfg.energy, basis=cfg.basis)
            hr_std = self._standardise(hr)
            if mask is not None:
                hr_std = hr_std.masked_fill(~mask, float("nan"))
            self.pod.fit(hr_std, progress=progress, distributed=distributed)
        r = self.pod.rank
        noise_input = "per_token" if cfg.schedule == "learned" else "time"
        dcfg = DenoiserConfig.preset(cfg.preset, rank=r, grid=self.pod.grid, noise_input=noise_input, **cfg.denoiser)
        torch.manual_seed(cfg.seed)
        self.denoiser = (PODDenoiser if cfg.denoiser_kind == "vit" else MLPDenoiser)(dcfg)
        self.schedule = make_schedule(cfg.schedule, rank=r, prediction=cfg.prediction)
        self.ema = copy.deepcopy(nn.ModuleList([self.denoiser, self.schedule])).requires_grad_(False)

    @property
    def noise_input(self) -> str:
        return self.denoiser.config.noise_input

    # ------------------------------------------------------------------ training

    def draw_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None, schedule=None):
        """The training noise for tokens ``x0 [B, L, r]``: times ``t [B] ~ U(0, t_max)`` and ``ε``."""
        schedule = schedule or self.schedule
        t_max = schedule.t_max(self.config.prediction)
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype) * t_max
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return t, eps

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None,
             denoiser=None, schedule=None, noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The training loss for token batches ``x0, cond [B, L, r]``.

        Fixed schedules: mean squared error of the ε- or v-prediction, ``t ~ U(0, t_max)``.
        Learned schedule: the continuous-time diffusion loss ``E[−λ'(t) ‖ε − ε̂‖²]`` per mode
        (normalised by ``λ_max − λ_min``) plus ``smoothness · E[(∂²λ/∂t²)²]``.
        ``noise``: ``(t [B], ε [B, L, r])`` drawn already (``draw_noise``); else drawn from ``generator``.
        """
        denoiser = denoiser or self.denoiser
        schedule = schedule or self.schedule
        t, eps = noise if noise is not None else self.draw_noise(x0, generator, schedule)
        lam = schedule.log_snr(t, cond).to(x0.dtype)
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        x_t = alpha * x0 + sigma * eps
        level = t if self.noise_input == "time" else lam.expand_as(x0)
        out = denoiser(x_t, cond, level)
        if not schedule.learned:
            target = alpha * eps - sigma * x0 if self.config.prediction == "v" else eps
            return F.mse_loss(out, target)
        eps_hat = sigma * x_t + alpha * out if self.config.prediction == "v" else out
        span = schedule.lambda_max - schedule.lambda_min
        weight = -schedule.dlog_snr_dt(t, cond) / span  # >= 0, mean about 1
        diffusion = (weight * (eps - eps_hat) ** 2).mean()
        return diffusion + self.config.smoothness * schedule.smoothness(t, cond) / span**2

    def _state(self, optimizer, generator: torch.Generator) -> dict:
        return {
            "format": FORMAT + ".checkpoint", "step": self.step_count, "history": list(self.history),
            "denoiser": self.denoiser.state_dict(), "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(), "generator": generator.get_state(),
        }

    def fit(self, lr: torch.Tensor, hr: torch.Tensor, mask: torch.Tensor | None = None, *,
            steps: int | None = None, progress: bool = True, checkpoint: str | Path | None = None,
            checkpoint_every: int = 200, resume: bool = True, log_every: int = 50,
            distributed: bool | None = None) -> list[float]:
        """Fits the POD (unless given), then trains the denoiser (and a learned schedule).

        Args:
            lr, hr: ``[N, C, h, w]`` and ``[N, C, h·scale, w·scale]``; NaN marks masked pixels.
                In a distributed run, this rank's contiguous shard (``distributed.shard``), in
                rank order.
            mask: optional bool ``[..., H, W]`` for ``hr`` (True = valid).
            steps: optimiser steps (default ``config.train_steps``), counted from 0 across resumes.
            checkpoint: a file written atomically every ``checkpoint_every`` steps and at the
                end (by rank 0); with ``resume`` an existing one is loaded (weights, EMA,
                optimiser, RNG, step, loss history) and training continues from its step.
            distributed: train with DistributedDataParallel over the default process group;
                None means "if one is initialised with more than one rank". The global batch is
                ``config.batch_size`` (divisible by the world size); standardisation, the POD
                fit and the tokens are reduced or gathered exactly, and every rank draws the
                same indices and noise, so the loss curve is the one-process curve.

        Returns:
            The loss history (one value per step; the global-batch loss when distributed).
        """
        from tqdm.auto import tqdm

        cfg = self.config
        _check_pair(lr, hr, cfg.scale)
        distributed = distributed_.is_active() if distributed is None else bool(distributed)
        rank, world = distributed_.rank_world() if distributed else (0, 1)
        # On the data's device: nccl reduces CUDA tensors only.
        total = (int(distributed_.all_sum(torch.tensor(hr.shape[0], device=hr.device)).item()) if distributed
                 else hr.shape[0])
        if total < 2:
            raise ValueError(f"training needs at least two samples; got {total}")
        if self.denoiser is None:
            self._build(lr, hr, mask, progress and rank == 0, distributed)
        steps = cfg.train_steps if steps is None else int(steps)
        with torch.no_grad():
            x0_all = distributed_.all_gather_rows(self.target_tokens(hr).float())
            cond_all = distributed_.all_gather_rows(self.condition_tokens(lr).float())
        batch = min(cfg.batch_size, x0_all.shape[0])
        rows = self._rank_rows(batch, rank, world)
        params = list(self.denoiser.parameters()) + list(self.schedule.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        path = Path(checkpoint) if checkpoint is not None else None
        generator = torch.Generator().manual_seed(cfg.seed)
        if path is not None and resume and path.is_file():
            self._restore(path, optimizer, generator)
        model = _TrainingModule(self)
        device = x0_all.device
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        use_amp = cfg.amp and device.type == "cuda"
        bar = tqdm(total=steps, initial=min(self.step_count, steps), disable=not progress or rank != 0,
                   desc="train", unit="step")
        while self.step_count < steps:
            # Every rank draws the global batch's indices and noise and keeps its rows.
            idx = torch.randint(0, x0_all.shape[0], (batch,), generator=generator)
            x0 = x0_all[idx]
            t, eps = self.draw_noise(x0, generator)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (self.step_count + 1) / max(1, cfg.warmup))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = model(x0[rows], cond_all[idx][rows], t[rows], eps[rows])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {self.step_count}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            self._update_ema()
            self.step_count += 1
            self.history.append(float(distributed_.all_sum(loss.detach().float()) / world))
            bar.update(1)
            if self.step_count % log_every == 0:
                bar.set_postfix(loss=f"{sum(self.history[-log_every:]) / log_every:.4f}")
            if path is not None and rank == 0 and (self.step_count % checkpoint_every == 0 or self.step_count == steps):
                state = self._state(optimizer, generator)
                atomic_write(path, lambda tmp: torch.save(state, tmp))
        bar.close()
        if distributed:
            distributed_.barrier()
        return self.history

    @staticmethod
    def _rank_rows(batch: int, rank: int, world: int) -> slice:
        """This rank's rows of a global batch (equal shares, so DDP's gradient mean is the batch mean)."""
        if batch % world:
            raise ValueError(f"batch_size must be divisible by the world size {world}; got {batch}")
        return slice(rank * batch // world, (rank + 1) * batch // world)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step_count) / (10 + self.step_count))
        live = nn.ModuleList([self.denoiser, self.schedule])
        for e, p in zip(self.ema.parameters(), live.parameters()):
            e.lerp_(p.detach(), 1 - decay)

    def _restore(self, path: Path, optimizer, generator: torch.Generator) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT + ".checkpoint":
                raise ValueError(f"not a {FORMAT} checkpoint")
            self.denoiser.load_state_dict(state["denoiser"])
            self.schedule.load_state_dict(state["schedule"])
            self.ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:
            raise ValueError(f"cannot resume from {path} (corrupted or from another model?): {exc}") from None
        torch.set_rng_state(state["rng"])
        generator.set_state(state["generator"])
        self.step_count, self.history = int(state["step"]), list(state["history"])

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, num_samples: int, steps: int | None = None,
                      seed: int | None = None, member_budget: int = 1 << 20, use_ema: bool = True,
                      progress: bool = False, image_ids=None) -> torch.Tensor:
        """``M`` members for condition tokens ``[B, L, r]`` -> ``[M, B, L, r]``, in chunks of at most
        ``member_budget`` token values per call.

        Member ``m`` of image ``b`` draws its noise from its own generator, seeded by
        ``(seed, image_ids[b], m)`` (``image_ids`` defaults to ``0..B-1``): the same seed gives the
        same samples whatever the chunking, the batch or the number of ranks.
        """
        from tqdm.auto import tqdm

        from .sampling import RowNoise, member_seed

        cfg = self.config
        denoiser, schedule = (self.ema[0], self.ema[1]) if use_ema else (self.denoiser, self.schedule)
        scheduler = DiffusionScheduler(schedule, cfg.prediction, cfg.sampler, cfg.eta)
        steps = cfg.sample_steps if steps is None else int(steps)
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
        out = [scheduler.sample(denoiser, flat[i : i + chunk], steps, noise_input=self.noise_input,
                                noise=RowNoise(seeds[i : i + chunk], cond.device))
               for i in tqdm(starts, disable=not progress, desc="sample", unit="chunk")]
        denoiser.train(was_training)
        return torch.cat(out).view(num_samples, B, L, r)

    @torch.no_grad()
    def sample(self, lr: torch.Tensor, num_samples: int = 16, steps: int | None = None, *,
               seed: int | None = None, variance: str = "block", return_samples: bool = False,
               member_budget: int = 1 << 20, progress: bool = False, image_ids=None,
               distributed: bool | None = None) -> SampleOutput:
        """Ensemble super-resolution of ``lr [B, C, h, w]``.

        Returns ``SampleOutput`` with the pixel ``mean`` and ``variance`` ``[B, C, H, W]``
        (analytic: ``variance="block"`` uses each token's r×r covariance, ``"diagonal"`` only its
        diagonal), and with ``return_samples`` the decoded members ``[M, B, C, H, W]``.
        ``image_ids`` name the images for seeding (default ``0..B-1``; see ``sample_tokens``).
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
        ids = torch.arange(lr.shape[0]) if image_ids is None else torch.as_tensor(image_ids)
        if ids.shape != (lr.shape[0],):
            raise ValueError(f"image_ids must hold one id per image ({lr.shape[0]}); got shape {tuple(ids.shape)}")
        distributed = distributed_.is_active() if distributed is None else bool(distributed)
        if distributed:
            rows = distributed_.shard(lr.shape[0], *distributed_.rank_world())
            lr, ids = lr[rows], ids[rows]
        cond = self.condition_tokens(lr).float()
        tokens = self.sample_tokens(cond, int(num_samples), steps, seed, member_budget, progress=progress,
                                    image_ids=ids.tolist())
        mean_tok, cov = pk.ensemble_moments(tokens, diagonal=variance == "diagonal")
        mean, var = self.pod.decode_moments(mean_tok, cov)
        scale = self.data_scale.view(1, -1, 1, 1).to(mean)
        mean = mean * scale + self.offset.view(1, -1, 1, 1).to(mean)
        var = var * scale**2
        samples = None
        if return_samples:
            M, B = tokens.shape[:2]
            decoded = self.pod.decode(tokens.reshape(M * B, *tokens.shape[2:]))
            samples = (decoded * scale + self.offset.view(1, -1, 1, 1).to(mean)).view(M, B, *decoded.shape[1:])
        if distributed:
            gather = distributed_.all_gather_rows
            mean, var = gather(mean), gather(var)
            if return_samples:
                samples = gather(samples.transpose(0, 1)).transpose(0, 1)
                tokens = gather(tokens.transpose(0, 1)).transpose(0, 1)
        return SampleOutput(mean, var, samples, tokens if return_samples else None)

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | Path) -> None:
        """``config.json``, ``pod.safetensors`` and ``weights.safetensors`` (live and EMA), atomically."""
        from safetensors.torch import save_file

        if self.denoiser is None:
            raise RuntimeError("nothing to save: the pipeline is not trained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "config": asdict(self.config),
            "denoiser": self.denoiser.config.to_dict(), "image_size": list(self.image_size),
            "offset": self.offset.tolist(), "data_scale": self.data_scale.tolist(), "step": self.step_count,
            "pod": type(self.pod).__name__,
        }
        self.pod.save(directory / "pod.safetensors")
        tensors = {f"live.{k}": v for k, v in nn.ModuleList([self.denoiser, self.schedule]).state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(directory / "weights.safetensors", lambda tmp: save_file(tensors, tmp))
        atomic_write(directory / "config.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))

    @classmethod
    def load(cls, directory: str | Path) -> "PODiffPipeline":
        """Reads a folder written by ``save``; bad or missing files give a clear error."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no podiff model at {directory} (config.json missing)")
        try:
            meta = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{config_path} is {meta.get('format')!r} version {meta.get('version')}; "
                             f"this podiff reads {FORMAT} version {FORMAT_VERSION}")
        if meta.get("pod", "PatchPOD") == "GlobalPOD":
            from .baselines import GlobalPOD as pod_class
        else:
            pod_class = PatchPOD
        pipe = cls(PipelineConfig(**meta["config"]), pod_class.load(directory / "pod.safetensors"))
        pipe.image_size = tuple(meta["image_size"])
        pipe.offset, pipe.data_scale = torch.tensor(meta["offset"]), torch.tensor(meta["data_scale"])
        dcfg = DenoiserConfig(**meta["denoiser"])
        pipe.denoiser = (PODDenoiser if pipe.config.denoiser_kind == "vit" else MLPDenoiser)(dcfg)
        pipe.schedule = make_schedule(pipe.config.schedule, rank=dcfg.rank, prediction=pipe.config.prediction)
        pipe.ema = copy.deepcopy(nn.ModuleList([pipe.denoiser, pipe.schedule])).requires_grad_(False)
        try:
            tensors = load_file(str(directory / "weights.safetensors"))
            live = {k[5:]: v for k, v in tensors.items() if k.startswith("live.")}
            ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            nn.ModuleList([pipe.denoiser, pipe.schedule]).load_state_dict(live)
            pipe.ema.load_state_dict(ema)
        except Exception as exc:
            raise ValueError(f"{directory / 'weights.safetensors'} is unreadable or does not match the config: "
                             f"{exc}") from None
        pipe.step_count = int(meta.get("step", 0))
        return pipe

    def num_parameters(self) -> int:
        return self.denoiser.num_parameters() + sum(p.numel() for p in self.schedule.parameters())

    def describe(self) -> str:
        return (f"PODiffPipeline: POD {self.pod}, denoiser {type(self.denoiser).__name__} "
                f"{self.num_parameters():,} parameters, schedule {self.config.schedule}, "
                f"prediction {self.config.prediction}, sampler {self.config.sampler}")


__all__ = ["PipelineConfig", "PODiffPipeline", "SampleOutput", "upsample"]
