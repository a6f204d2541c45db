"""podiff — probabilistic super-resolution by diffusion in a patchwise POD latent space.

The model layer over ``podiff_kernels``. The public API:

- ``PipelineConfig`` / ``TrainOptions`` (``podiff.config``): the one source of defaults;
- ``PODiffPipeline`` (``podiff.model``): a fitted model — sample, ensemble, save, load;
- ``fit``, ``fit_streamed``, ``calibrate_spread`` (``podiff.fitting``): what produces one;
- ``PatchPOD`` (``podiff.latent``): the fixed linear latent space;
- ``metrics`` (``podiff.evaluation.metrics``): the scores;
- ``workflows``: the command's ``train`` / ``sample`` / ``evaluate`` / ``demo`` as calls.

The packages, bottom to top (imports go down only): ``core``, ``data``, ``evaluation``,
``latent``, ``diffusion``, ``mean``, ``config``, ``model``, ``baselines``, ``fitting``,
``workflows``, ``cli``; ``interop`` adapts ``latent`` and ``diffusion`` to diffusers.
"""

from podiff.config import PipelineConfig, TrainOptions
from podiff.core.sample_output import SampleOutput
from podiff.core.version import __version__
from podiff.evaluation import metrics
from podiff.fitting import calibrate_spread, fit, fit_streamed
from podiff.latent.pod import PatchPOD
from podiff.model.pipeline import PODiffPipeline

__all__ = ["PODiffPipeline", "PatchPOD", "PipelineConfig", "SampleOutput", "TrainOptions", "__version__",
           "calibrate_spread", "fit", "fit_streamed", "metrics"]
