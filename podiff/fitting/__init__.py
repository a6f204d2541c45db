"""Fitting: the code that produces a fitted ``PODiffPipeline`` from fields (``fit``: scaling, mean
model, POD, noise correlation, training; ``fit_streamed``; ``calibrate_spread``)."""

from podiff.fitting.calibration import calibrate_spread
from podiff.fitting.fit import StreamedTokens, build, fit, fit_streamed, hold_out, loss, training_noise

__all__ = ["StreamedTokens", "build", "calibrate_spread", "fit", "fit_streamed", "hold_out", "loss", "training_noise"]
