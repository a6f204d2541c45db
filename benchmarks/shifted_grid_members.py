"""Issue 32's next candidate, as an experiment: the members of a model of any domain drawn on
several patch grids shifted by pixel offsets, so that their patch edges fall in different places.

Each shift ``(dy, dx)`` samples its share of the members on the domain padded by ``(p - dy) % p``
rows above and ``(p - dx) % p`` columns to the left (to whole patches below and right): the
padding is NaN, so the edge tokens' conditions are gappy-encoded from their pixels in the field
(``PODiffPipeline.for_domain`` with the field's valid pixels), and the decoded members are cropped
back. The ensemble of all shifts is a mixture, whose pixel mean and variance the members give
here. Prints RMSE, the members' fair CRPS, the std's seams (``metrics.grid_imprint``), the
patch-edge ratio and the band powers over the truth's, against the same members on one grid.

    python benchmarks/shifted_grid_members.py --model run/model --members 16 --shifts "0,0;2,0;0,2;2,2"
"""

from __future__ import annotations

import argparse
import json

import torch


def shifted_members(pipe, lr: torch.Tensor, members: int, shifts, seed: int = 0) -> torch.Tensor:
    """``members`` (split evenly over ``shifts``) ``[M, B, C, H, W]`` of a residual model of any
    domain for ``lr``, each share drawn on its shifted patch grid, spread-calibrated about the
    mixture's mean."""
    from podiff.data.standardise import unstandardise

    if pipe.mean_model is None or pipe.domain_limits():
        raise ValueError("shifted_members needs a residual model of any domain (PipelineConfig(domain='any'))")
    p, s = pipe.pod.patch_size, pipe.config.scale
    B, C = lr.shape[0], pipe.offset.numel()
    H, W = lr.shape[-2] * s, lr.shape[-1] * s
    per = members // len(shifts)
    with torch.no_grad():
        mu = pipe.mean_model.predict(lr)
        field = pipe._condition_field(mu)
        out = []
        for k, (dy, dx) in enumerate(shifts):
            a, b = (p - dy) % p, (p - dx) % p
            Hp, Wp = -(-(H + a) // p) * p, -(-(W + b) // p) * p
            Hp, Wp = -(-Hp // s) * s, -(-Wp // s) * s
            valid = torch.zeros(C, Hp, Wp, dtype=torch.bool)
            valid[:, a : a + H, b : b + W] = pipe.pod.valid_pixels.cpu()
            view = pipe.for_domain((Hp, Wp), valid)
            padded = torch.full((B, C, Hp, Wp), float("nan"))
            padded[..., a : a + H, b : b + W] = field
            cond = view.pod.encode(padded, standardized=False) / pipe.mean_model.cond_scale
            tokens = view.sample_tokens(cond.float(), per, seed=seed + 1000 * k)
            decoded = view.pod.decode(tokens.reshape(per * B, *tokens.shape[2:]))
            x = unstandardise(decoded, pipe.offset, pipe.data_scale).view(per, B, C, Hp, Wp)
            out.append(x[..., a : a + H, b : b + W])
        residuals = torch.cat(out)
        centre = residuals.mean(0)
        return centre + (residuals - centre) * pipe.calibration.spread + mu


def scores(members: torch.Tensor, truth: torch.Tensor, patch: int) -> dict:
    from podiff.evaluation import metrics

    return {"rmse": metrics.rmse(members.mean(0), truth),
            "fair_crps": metrics.crps_ensemble(members, truth, fair=True),
            "std_seams": metrics.grid_imprint(members.std(0), patch),
            "patch_edge_ratio": metrics.patch_edge_ratio(members, truth, patch),
            "bands": [round(r["ratio"], 3) for r in metrics.band_power_ratios(members, truth)]}


def main(argv=None) -> int:
    from podiff import PODiffPipeline
    from podiff.data import datasets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved model of any domain (train --domain any)")
    parser.add_argument("--data", default="sst", help="a packaged dataset (its test split)")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--shifts", default="0,0;2,0;0,2;2,2", help="pixel offsets dy,dx separated by ;")
    args = parser.parse_args(argv)
    pipe = PODiffPipeline.load(args.model)
    lr, hr, _ = datasets.load(args.data, pipe.config.scale).split("test")
    shifts = [tuple(int(v) for v in item.split(",")) for item in args.shifts.split(";")]
    result = {}
    for label, grids in (("one grid", [(0, 0)]), ("shifted grids", shifts)):
        result[label] = {"shifts": grids, **scores(shifted_members(pipe, lr, args.members, grids), hr,
                                                   pipe.pod.patch_size)}
        print(label, json.dumps(result[label]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
