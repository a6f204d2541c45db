"""Fitting: the code that produces a fitted ``PODiffPipeline`` from fields (``fit``: scaling, mean
model, POD, noise correlation, training; ``fit_streamed``; ``calibrate_spread``; ``refit`` on every
field once the held-out fields have made the choices)."""

from podiff.fitting.calibration import calibrate_spread
from podiff.fitting.fit import StreamedTokens, build, fit, fit_streamed, hold_out, loss, training_noise
from podiff.fitting.refit import continuation_steps, refit

__all__ = ["StreamedTokens", "build", "calibrate_spread", "continuation_steps", "fit", "fit_streamed", "hold_out",
           "loss", "refit", "training_noise"]
