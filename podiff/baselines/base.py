"""What every baseline shares: ``BaselineEntry`` (how the training and evaluation workflows make,
fit, save and load one). The trained baselines' loop is ``mean.training`` (the U-Net is also a
mean model); ``Deterministic`` (``sample`` for a point predictor) is ``core.sample_output``'s.

Every baseline has ``predict(lr) -> [N, C, H, W]`` in data units and ``sample(lr, num_samples=...)``
returning a ``SampleOutput`` like the pipeline's (zero variance, identical members).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from podiff.core.sample_output import Deterministic


@dataclass(frozen=True)
class BaselineEntry:
    """A baseline as the workflows see it (``BASELINES`` in ``podiff.baselines``).

    ``make(pipe)``: the baseline made from a trained model alone (nothing to fit or save), or
    ``fit(pipe, lr, hr, validation, options, progress) -> (baseline, info)``: fitted by ``podiff
    train`` on the model's training fields and tuned on its validation fields (None: skipped
    under these ``options``), saved as ``file`` in the model's ``baselines/`` folder and read back
    by ``load(pipe, path)`` (written by ``save(baseline, path, info)``, default
    ``baseline.save(path)``). ``refit(pipe, lr, hr)``: for a model saved without it, fitted at
    evaluation on the data's train split (None: left out then). ``refit_on_all(baseline, pipe, lr,
    hr, held_out, options, progress) -> (baseline, info)``: once its settings are chosen, the
    baseline refitted on the training fields ``lr, hr`` and the ``held_out = (lr_val, hr_val)``
    ones, as a practitioner would (None: kept as fitted).
    """

    name: str
    make: Callable | None = None
    fit: Callable | None = None
    load: Callable | None = None
    file: str | None = None
    refit: Callable | None = None
    refit_on_all: Callable | None = None
    save: Callable = lambda baseline, path, info: baseline.save(path)


__all__ = ["BaselineEntry", "Deterministic"]  # Deterministic: core.sample_output
