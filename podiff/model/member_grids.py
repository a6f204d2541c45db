"""Members on several patch grids (``PipelineConfig.member_grids``): ``PODiffPipeline.sample``'s
ensemble with equal shares of the members drawn on the fitted grid and on shifted grids
(``latent.windows.member_windows``), pooled exactly.

>>> # pipe.config.member_grids = 4: pipe.sample(lr, 32) calls on_member_grids(pipe, lr, mu, 32, None, ...)
"""

from __future__ import annotations

import copy

import torch

from podiff.core.sample_output import SampleOutput
from podiff.latent.pod import PatchPOD
from podiff.latent.windows import crop_field, member_windows


def on_member_grids(pipe, lr: torch.Tensor, mu: torch.Tensor | None, num_samples: int, steps: int | None,
                    **options) -> SampleOutput:
    """``pipe.ensemble`` (of the residual about ``mu``, the mean model's prediction of ``lr``, for a
    residual model) with the members drawn on ``config.member_grids`` patch grids
    (``latent.windows.member_windows``), an equal share on each, as one ensemble: each grid's
    members are drawn on the field padded with NaN to its whole patches (its edge tokens
    gappy-encoded, as ``grid_shifts`` trains them) and cropped back; the pixel mean and
    variance are the pooled members' (unbiased, as ``ensemble_moments``), from each grid's
    closed-form moments by the law of total variance. No tokens are returned (the grids
    differ)."""
    count, pod = pipe.config.member_grids, pipe.pod
    if not isinstance(pod, PatchPOD) or pod.local or pod.stride != pod.patch_size:
        kind = ("a global POD" if not isinstance(pod, PatchPOD) else "a local basis" if pod.local
                else f"overlapping patches (stride {pod.stride} < patch {pod.patch_size})")
        raise ValueError(f"member_grids={count} draws members on shifted patch grids, which needs a shared POD "
                         f"basis without overlap; this model has {kind} (member_grids=1 samples it)")
    per = num_samples // count
    if num_samples % count or per < 2:
        raise ValueError(f"num_samples must be a multiple of member_grids={count} with at least 2 members per "
                         f"grid; got {num_samples}")
    p, (H, W) = pod.patch_size, pipe.image_size
    valid = pod.valid_pixels.to(torch.float32)
    means, variances, samples = [], [], []
    for k, (top, left) in enumerate(member_windows(tuple(pod.grid), p, count)):
        gh, gw = -(-(H - top) // p), -(-(W - left) // p)
        rows, cols = slice(top, top + gh * p), slice(left, left + gw * p)
        if (top, left) == (0, 0):
            view, cond = pipe, pipe.condition_tokens(lr, mu).float()
        else:
            view = copy.copy(pipe)
            view.pod = pod.on_domain((gh * p, gw * p), crop_field(valid, rows, cols) == 1)
            view.image_size, view.grid_origin = (gh * p, gw * p), (top / p, left / p)
            cond = pipe.window_condition(lr, mu, rows, cols)
        out = view.ensemble(cond, per, steps, first_member=k * per, **options)
        inside = (Ellipsis, slice(-top, -top + H), slice(-left, -left + W))
        means.append(out.mean[inside])
        variances.append(out.variance[inside])
        if out.samples is not None:
            samples.append(out.samples[inside])
    means = torch.stack(means)
    mean = means.mean(0)
    within = torch.stack(variances).sum(0) * (per - 1)
    between = ((means - mean) ** 2).sum(0) * per
    return SampleOutput(mean, (within + between) / (num_samples - 1), torch.cat(samples) if samples else None)


__all__ = ["on_member_grids"]
