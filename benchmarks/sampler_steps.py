"""Fewer sampling steps: samplers and step counts against a reference on trained models, one run.

For each trained model (a ``podiff train`` or ``podiff demo`` run folder) and its dataset's test
split: the same members (seed 0) drawn by each sampler and step count (``--configs``, the first
the reference: by default DDIM-20, the default until 2026-12-07), scored as ``podiff evaluate``
scores the model (the closed-form CRPS and MACE with the model's calibrated spread and error
shape), with the Gaussian CRPS, the members' fair CRPS, the ensemble mean's RMSE and the
sampling time per member.

    python benchmarks/sampler_steps.py --run podiff-demo/run --dataset sst --out sst_samplers.json

``--dataset`` is what ``podiff demo --dataset`` / ``podiff train --data`` took (a packaged name or a
file); the test split is the one the demo kept unseen.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from podiff.core.io import write_json
from podiff.data import datasets as data
from podiff.evaluation import metrics, report
from podiff.model.pipeline import PODiffPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

#: (sampler, steps): the reference first.
CONFIGS = [("ddim", 20), ("ddim", 50), ("ddim", 10), ("dpmsolver++", 5), ("dpmsolver++", 8), ("dpmsolver++", 10),
           ("sde-dpmsolver++", 10), ("sde-dpmsolver++", 20)]


def score(pipe: PODiffPipeline, lr: torch.Tensor, hr: torch.Tensor, sampler: str, steps: int, members: int) -> dict:
    t0 = time.perf_counter()
    out = pipe.sample(lr, num_samples=members, steps=steps, sampler=sampler, seed=0, return_samples=True)
    seconds = time.perf_counter() - t0
    cal = pipe.calibration
    scores = report.score(out.mean, hr, out.variance.clamp_min(0), out.samples, cal.error_quantiles,
                          cal.error_band_edges)
    return {"sampler": sampler, "steps": steps, "crps": scores["crps"], "mace": scores["mace"],
            "crps_gaussian": metrics.crps_gaussian(out.mean, out.variance.clamp_min(0), hr),
            "crps_members_fair": scores["crps_ensemble_fair"],
            "rmse": metrics.rmse(out.mean, hr), "seconds_per_member": seconds / members}


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``"ddim:20,dpmsolver++:10"`` -> ``[("ddim", 20), ("dpmsolver++", 10)]``."""
    out = []
    for item in text.split(","):
        name, _, steps = item.partition(":")
        if not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--configs: each item is sampler:steps with steps >= 1; got {item!r}")
        out.append((name, int(steps)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="trained model folder")
    parser.add_argument("--dataset", required=True, help="packaged name (sst, mri, images) or data file")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--configs", type=parse_configs, default=CONFIGS,
                        help="sampler:steps,… the first the reference (default: " +
                             ",".join(f"{a}:{b}" for a, b in CONFIGS) + ")")
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    run = Path(args.run)
    pipe = PODiffPipeline.load(run / "model" if (run / "model").is_dir() else run)  # a train run or its model
    ds = data.load(args.dataset, pipe.config.scale)
    lr, hr, _ = ds.split("test")
    rows = []
    for sampler, steps in args.configs:
        rows.append(score(pipe, lr, hr, sampler, steps, args.num_samples))
        row, ref = rows[-1], rows[0]
        print(f"{sampler:>16} {steps:3d} steps: CRPS {row['crps']:.5g} ({row['crps'] / ref['crps']:.3f}× "
              f"{ref['sampler']}-{ref['steps']}), MACE {row['mace']:.4f}, members' CRPS {row['crps_members_fair']:.5g} "
              f"({row['crps_members_fair'] / ref['crps_members_fair']:.3f}×), RMSE {row['rmse']:.5g}, "
              f"{row['seconds_per_member']:.3f} s/member", flush=True)
    write_json(args.out, {"run": args.run, "dataset": args.dataset, "test_fields": int(hr.shape[0]),
                          "members": args.num_samples, "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
