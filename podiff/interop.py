"""Using podiff inside diffusers-style code: the patch POD as a drop-in autoencoder, and
podiff's noise schedules as a diffusers ``DDIMScheduler``.

**Autoencoder.** ``PODAutoencoder(pod)`` has the interface of a diffusers autoencoder:
``encode(x).latent_dist.sample()`` / ``.mode()``, ``decode(z).sample``, ``config.scaling_factor``,
``config.latent_channels``, ``dtype``/``device``. Latents are laid out as a VAE's are,
``[B, r, nH, nW]``: the ``r`` POD modes are the channels and the patch grid is the spatial
grid (``nH = (H − p)/s + 1``), so a latent-diffusion pipeline can swap its VAE for the POD.
The POD is deterministic: its latent distribution has zero variance (``sample() == mode()``).
Latents are standardised (unit variance per mode) by default, so ``scaling_factor`` is 1.

>>> import torch
>>> from podiff import PatchPOD
>>> x = torch.randn(8, 1, 16, 16)
>>> vae = PODAutoencoder(PatchPOD(4, rank=6).fit(x, progress=False))   # a fitted PatchPOD
>>> z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
>>> z.shape                                                              # [B, r, nH, nW]
torch.Size([8, 6, 4, 4])
>>> vae.decode(z / vae.config.scaling_factor).sample.shape               # [B, C, H, W]
torch.Size([8, 1, 16, 16])

**Scheduler.** ``ddim_scheduler(schedule)`` builds diffusers' ``DDIMScheduler`` on the same
noise schedule (discretised at ``num_train_timesteps``, trailing timesteps, zero terminal SNR,
v-prediction), with ``alphas_cumprod`` set to the schedule's exact values; podiff's denoiser
then takes ``continuous_time(timestep)``. Driven by it, podiff's denoiser gives podiff's own
DDIM samples (to float32 rounding). diffusers is an optional extra (``pip install diffusers``),
needed only for ``ddim_scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from podiff.diffusion.schedules import NoiseSchedule
from podiff.latent.pod import PatchPOD


class _Config(dict):
    """A read-only dict with attribute access, like diffusers' ``FrozenDict`` config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Output:
    """diffusers' ``BaseOutput`` habits: attribute access, ``out[0]``, ``to_tuple()``."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    def __getitem__(self, index):
        return self.to_tuple()[index]


@dataclass
class PODLatentDistribution(_Output):
    """The POD's latent "distribution": a point mass at ``mean [B, r, nH, nW]``."""

    mean: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    var = std

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other=None) -> torch.Tensor:
        raise NotImplementedError("a POD latent is deterministic: its KL divergence is not defined")


@dataclass
class AutoencoderOutput(_Output):
    """``latent_dist``: the latent distribution (diffusers' ``AutoencoderKLOutput`` shape)."""

    latent_dist: PODLatentDistribution


@dataclass
class DecoderOutput(_Output):
    """``sample``: decoded images ``[B, C, H, W]``."""

    sample: torch.Tensor


class PODAutoencoder(nn.Module):
    """A fitted ``PatchPOD`` with a diffusers autoencoder's interface (see the module docstring).

    Args:
        pod: a fitted ``PatchPOD``.
        standardized: latents ``a_k/√λ_k`` (unit variance per mode; default) or raw coefficients.
        scaling_factor: stored in ``config`` for pipelines that multiply latents by it.
    """

    def __init__(self, pod: PatchPOD, standardized: bool = True, scaling_factor: float = 1.0):
        super().__init__()
        if not isinstance(pod, PatchPOD):
            raise TypeError(f"pod must be a fitted PatchPOD; got {type(pod).__name__}")
        pod._check_fitted()
        self.pod, self.standardized = pod, bool(standardized)
        nH, nW = pod.grid
        self.register_buffer("_anchor", torch.zeros((), dtype=pod.dtype), persistent=False)  # dtype / device
        self.config = _Config(
            in_channels=pod.channels, out_channels=pod.channels, latent_channels=pod.rank,
            sample_size=list(pod.image_size), latent_size=[nH, nW], patch_size=pod.patch_size,
            stride=pod.stride, basis=pod.basis_kind, scaling_factor=float(scaling_factor),
            shift_factor=None, standardized=self.standardized,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, r]`` -> latents ``[B, r, nH, nW]``."""
        nH, nW = self.pod.grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], nH, nW)

    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, r, nH, nW]`` -> tokens ``[B, L, r]``."""
        nH, nW = self.pod.grid
        if latents.dim() != 4 or tuple(latents.shape[1:]) != (self.pod.rank, nH, nW):
            raise ValueError(f"latents must be [B, r={self.pod.rank}, nH={nH}, nW={nW}]; "
                             f"got {tuple(getattr(latents, 'shape', ()))}")
        return latents.flatten(2).transpose(1, 2)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images ``[B, C, H, W]`` -> ``AutoencoderOutput(latent_dist)`` with latents ``[B, r, nH, nW]``."""
        dist = PODLatentDistribution(self.to_latents(self.pod.encode(x, standardized=self.standardized)))
        return AutoencoderOutput(dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents ``[B, r, nH, nW]`` -> ``DecoderOutput(sample [B, C, H, W])`` (overlaps averaged)."""
        image = self.pod.decode(self.to_tokens(z).contiguous(), standardized=self.standardized)
        return DecoderOutput(image) if return_dict else (image,)

    def decode_moments(self, latent_mean: torch.Tensor, latent_cov: torch.Tensor):
        """Pixel mean and variance ``[B, C, H, W]`` from latent moments: ``latent_mean [B, r, nH, nW]``,
        ``latent_cov [B, L, r, r]`` (or ``[B, L, r]`` variances), e.g. from ``ensemble_moments``."""
        return self.pod.decode_moments(self.to_tokens(latent_mean).contiguous(), latent_cov,
                                       standardized=self.standardized)

    def forward(self, x: torch.Tensor) -> DecoderOutput:
        return self.decode(self.encode(x).latent_dist.mode())


def continuous_time(timestep, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A diffusers timestep ``i`` in ``0..N-1`` -> podiff's time ``t = (i + 1)/N`` in ``(0, 1]``."""
    return (torch.as_tensor(timestep, dtype=torch.float64) + 1) / int(num_train_timesteps)


def ddim_scheduler(schedule: NoiseSchedule, num_train_timesteps: int = 1000, prediction_type: str = "v", **kwargs):
    """diffusers' ``DDIMScheduler`` on podiff's fixed ``schedule``.

    ``alphas_cumprod[i] = ᾱ((i + 1)/N)`` (rounded once to float32: diffusers' own float32 cumulative
    product of the betas drifts from it by up to 6e-7 relative over 1000 steps); trailing timestep
    spacing, which with ``ᾱ(1) = 0`` starts at zero SNR as podiff does; ``set_alpha_to_one``
    (the last step lands on clean data, ``t = 0``). v-prediction only: an ε-prediction sampler
    cannot start at zero SNR, where ``x̂_0 = (x_t − σ ε̂)/α`` divides by ``α = 0``.
    ``kwargs`` go to ``DDIMScheduler`` (e.g. ``eta`` is given to ``step``, not here).
    """
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        raise ImportError("ddim_scheduler needs diffusers: pip install diffusers") from None
    if schedule.learned:
        raise ValueError("a learned (per-token, per-mode) schedule has no diffusers equivalent; "
                         "use podiff's DiffusionScheduler")
    if prediction_type != "v":
        raise ValueError(f"prediction_type must be 'v' (a DDIM from zero SNR needs it); got {prediction_type!r}")
    N = int(num_train_timesteps)
    t = continuous_time(torch.arange(N), N)
    alpha_bar = torch.sigmoid(schedule.log_snr(t).flatten().double())  # ᾱ = sigmoid(λ), exact at both ends
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    betas = (1 - alpha_bar / previous).clamp(0, 1)
    scheduler = DDIMScheduler(num_train_timesteps=N, trained_betas=betas.tolist(), prediction_type="v_prediction",
                              timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, **kwargs)
    scheduler.alphas_cumprod = alpha_bar.float()
    return scheduler


__all__ = ["AutoencoderOutput", "DecoderOutput", "PODAutoencoder", "PODLatentDistribution", "continuous_time",
           "ddim_scheduler"]
