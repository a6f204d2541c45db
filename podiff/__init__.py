"""podiff — probabilistic super-resolution by diffusion in a patchwise-POD latent space.

The model layer (``PatchPOD``, the ViT denoiser, schedules, pipeline, metrics) is
built on the drop-in ops of :mod:`podiff_kernels`; the ops are usable on their own.
"""

__version__ = "0.1.0"
