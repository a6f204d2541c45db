"""The samplers by name: each a ``base.Sampler`` (its update rule from ``base.StepQuantities``).
A new sampler is one file here and one line in ``SAMPLERS``; ``DiffusionScheduler``, the config
and the command take it from there."""

from podiff.diffusion.samplers.ancestral import Ancestral
from podiff.diffusion.samplers.base import Sampler, StepQuantities
from podiff.diffusion.samplers.ddim import DDIM
from podiff.diffusion.samplers.dpm_solver import DPMSolverPP, SDEDPMSolverPP

SAMPLERS: dict[str, type[Sampler]] = {
    "ddim": DDIM,
    "ancestral": Ancestral,
    "dpmsolver++": DPMSolverPP,
    "sde-dpmsolver++": SDEDPMSolverPP,
}

__all__ = ["SAMPLERS", "Sampler", "StepQuantities"]
