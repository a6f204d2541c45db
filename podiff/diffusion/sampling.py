"""Samplers: a diffusers-style scheduler whose ``step`` returns the previous sample.

``DiffusionScheduler(schedule, prediction_type="v", sampler="ddim", eta=0.0)``;
``set_timesteps(S)`` gives ``S + 1`` times from ``t_max`` down to 0, and
``step(model_output, t, s, sample, cond=None, generator=None)`` moves ``sample`` from
time ``t`` to the earlier time ``s``. Every coefficient comes from the schedule's log-SNR
at ``t`` and ``s`` (per token and mode for a learned schedule), in ratios computed in log
space (``1 − ᾱ_t/ᾱ_s = −expm1(log ᾱ_t − log ᾱ_s)``), so no step divides by a vanishing α:

- v-prediction: ``x̂_0 = α_t x_t − σ_t v``, ``ε̂ = σ_t x_t + α_t v`` — stable at zero SNR.
- ε-prediction: ``x̂_0 = (x_t − σ_t ε̂)/α_t``, used only for ``t <= t_max("epsilon")``
  (σ/α <= 10; see ``podiff.diffusion.schedules``).

Samplers: ``"ddim"`` (η = ``eta``; 0 is deterministic), ``"ancestral"`` (the DDPM
posterior ``q(x_s | x_t, x̂_0)``), and DPM-Solver++ (2M) (Lu et al. 2022, the multistep
second-order solver in data prediction): ``"dpmsolver++"`` (deterministic) and
``"sde-dpmsolver++"`` (its stochastic variant), as diffusers' ``DPMSolverMultistepScheduler``
names them (midpoint form, first order on the first step and on the step that lands on
clean data). With ``h = (λ_s − λ_t)/2`` (half log-SNR steps) and ``D = x̂_0 + (x̂_0 − x̂_0')/(2 r)``
from this step's and the previous step's ``x̂_0`` (``r = h'/h``):

- ``"dpmsolver++"``: ``x_s = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) D``
- ``"sde-dpmsolver++"``: ``x_s = (σ_s/σ_t) e^{−h} x_t + α_s (1 − e^{−2h}) D + σ_s √(1 − e^{−2h}) z``

Every coefficient is elementwise in λ, so a learned per-token, per-mode schedule takes the
same steps. A multistep sampler keeps the previous step's ``x̂_0`` and ``h``: ``set_timesteps``
(and ``sample``) start a fresh chain.

Noise comes from one ``generator``, or from ``RowNoise``: one seeded generator per chain row
(``member_seed(seed, image, member)``), so a member's sample does not depend on which other
rows share its batch — the same ensemble whatever the chunking or the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from podiff.diffusion.samplers import SAMPLERS, StepQuantities
from podiff.diffusion.schedules import NoiseSchedule


@dataclass
class SchedulerOutput:
    """``prev_sample`` at the earlier time; ``pred_original_sample`` is ``x̂_0``."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def member_seed(seed: int, image: int, member: int) -> int:
    """A well-mixed 63-bit seed for one (image, member) chain (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed), int(image), int(member)]).generate_state(1, np.uint64)[0] >> 1)


class RowNoise:
    """Standard normal noise for a batch of chains, row ``i`` from its own generator seeded ``seeds[i]``.

    ``noise(shape, dtype)`` returns ``[len(seeds), *shape[1:]]`` on ``device``; each call advances
    every row's stream. The generators are CPU generators and the noise is moved: the same seeds
    give the same noise on every device (as diffusers' ``randn_tensor`` does).
    """

    def __init__(self, seeds, device=None, signs=None):
        self.device = torch.device(device or "cpu")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # signs: −1 rows are the mirror chain of a +1 row with the same seed (antithetic members).
        self.signs = None if signs is None else torch.tensor([float(v) for v in signs])
        if self.signs is not None and self.signs.numel() != len(self.generators):
            raise ValueError(f"signs must hold one value per seed ({len(self.generators)}); got {self.signs.numel()}")

    def __call__(self, shape, dtype=torch.float32) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"RowNoise has {len(self.generators)} rows; asked for shape {tuple(shape)}")
        rows = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators])
        if self.signs is not None:
            rows = rows * self.signs.to(dtype).view(-1, *([1] * (rows.dim() - 1)))
        return rows.to(self.device, non_blocking=True)


Noise = Callable[..., torch.Tensor]



def _generator_noise(generator: torch.Generator | None, device) -> Noise:
    """Noise from ``generator`` on its own device, moved to ``device`` (or from ``device``'s default RNG)."""
    source = generator.device if generator is not None else device
    return lambda shape, dtype: torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


class DiffusionScheduler:
    """Moves samples from ``t`` to ``s < t`` given the denoiser's output (see module doc)."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "v", sampler: str = "ddim", eta: float = 0.0):
        if prediction_type not in ("v", "epsilon"):
            raise ValueError(f"prediction_type must be 'v' or 'epsilon'; got {prediction_type!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}; got {sampler!r}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1]; got {eta}")
        self.schedule, self.prediction_type, self.sampler, self.eta = schedule, prediction_type, sampler, float(eta)
        self.solver = SAMPLERS[sampler](self.eta)  # the update rule (podiff.diffusion.samplers)
        self.timesteps: torch.Tensor | None = None

    @property
    def stochastic(self) -> bool:
        """Whether a step adds noise: the ancestral and SDE samplers, or DDIM with η > 0."""
        return self.solver.stochastic

    @property
    def multistep(self) -> bool:
        """Whether a step uses the previous step's prediction (DPM-Solver++ (2M))."""
        return self.solver.multistep

    def set_timesteps(self, steps: int) -> torch.Tensor:
        """``steps + 1`` times, uniform from ``t_max`` to 0."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        self.timesteps = torch.linspace(self.schedule.t_max(self.prediction_type), 0.0, int(steps) + 1)
        self.solver.reset()
        return self.timesteps

    def predictions(self, model_output, x_t, lam_t):
        """``(x̂_0, ε̂)`` from the model output at log-SNR ``lam_t``."""
        alpha, sigma = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(-lam_t).sqrt()
        if self.prediction_type == "v":
            return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
        return (x_t - sigma * model_output) / alpha, model_output

    def step(self, model_output: torch.Tensor, t, s, sample: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> SchedulerOutput:
        """One step from time ``t`` to ``s`` (scalars or ``[B]``, on the CPU, e.g. from
        ``set_timesteps``). A multistep sampler takes a first-order step where ``s`` is 0."""
        noise = _generator_noise(generator, sample.device)
        final = bool((torch.as_tensor(s, dtype=torch.float64) <= 0).all())
        return self._step(self.schedule, model_output, t, s, sample, cond, noise, final=final)

    def _step(self, schedule, model_output, t, s, sample, cond, noise: Noise, final: bool = False) -> SchedulerOutput:
        B = sample.shape[0]
        t = torch.as_tensor(t, dtype=sample.dtype, device=sample.device).expand(B)
        s = torch.as_tensor(s, dtype=sample.dtype, device=sample.device).expand(B)
        lam_t = schedule.log_snr(t, cond).to(sample.dtype)
        lam_s = schedule.log_snr(s, cond).to(sample.dtype)
        x0, eps = self.predictions(model_output, sample, lam_t)
        # log ᾱ = log sigmoid(λ), log(1 − ᾱ) = log sigmoid(−λ): exact at both ends.
        log_ab_t, log_ab_s = F.logsigmoid(lam_t), F.logsigmoid(lam_s)
        alpha_s, sigma2_s = log_ab_s.mul(0.5).exp(), torch.sigmoid(-lam_s)
        sigma2_t = torch.sigmoid(-lam_t)
        q = StepQuantities(sample, x0, eps, lam_t, lam_s, log_ab_t, log_ab_s, alpha_s, sigma2_t, sigma2_s, final)
        return SchedulerOutput(self.solver.step(q, noise), x0)

    @torch.no_grad()
    def sample(self, denoiser, cond: torch.Tensor, steps: int, generator: torch.Generator | None = None,
               noise_input: str = "time", noise: Noise | None = None, geometry: dict | None = None) -> torch.Tensor:
        """Runs the whole chain for condition tokens ``cond [B, L, r_c]``; returns ``x_0 [B, L, r]``.

        Noise from ``noise(shape, dtype)`` (e.g. ``RowNoise``) when given, else from ``generator``.
        ``geometry``: the tokens' ``grid`` (and ``origin``) when they are not the denoiser's own grid
        (another domain), passed to it.
        """
        times = self.set_timesteps(steps).to(cond.device)
        r = denoiser.config.rank
        bound = self.schedule.bind(cond)  # a learned schedule's weights, once per chain
        noise = noise or _generator_noise(generator, cond.device)
        x = noise((cond.shape[0], cond.shape[1], r), cond.dtype)
        last = len(times) - 2
        for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=False)):
            tb = t.expand(cond.shape[0]).to(cond.dtype)
            level = tb if noise_input == "time" else bound.log_snr(tb, cond).expand(-1, -1, r)
            out = denoiser(x, cond, level, **(geometry or {})).to(x.dtype)  # the updates stay float32 under autocast
            x = self._step(bound, out, t, s, x, cond, noise, final=i == last).prev_sample
        self.solver.reset()
        return x
