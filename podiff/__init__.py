"""podiff — probabilistic super-resolution by diffusion in a patchwise POD latent space.

The model layer over ``podiff_kernels``: ``PatchPOD`` (the fixed linear latent space).
"""

from .pod import PatchPOD

__version__ = "0.1.0"

__all__ = ["PatchPOD", "__version__"]
