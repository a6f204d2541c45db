"""Fewer sampling steps: DPM-Solver++ (2M) against the 50-step DDIM on trained models, one run.

For each trained model (a ``podiff train`` or ``podiff demo`` run folder) and its dataset's test
split: the same members (seed 0) drawn by each sampler and step count, scored by the ensemble's
Gaussian CRPS (the closed-form CRPS of the pixel mean and variance, what ``podiff evaluate``
reports), the members' fair CRPS and the ensemble mean's RMSE, with the sampling time per member.

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
from podiff.evaluation import metrics
from podiff.model.pipeline import PODiffPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

#: (sampler, steps): the reference first.
CONFIGS = [("ddim", 50), ("ddim", 10), ("dpmsolver++", 5), ("dpmsolver++", 8), ("dpmsolver++", 10),
           ("sde-dpmsolver++", 10), ("sde-dpmsolver++", 20)]


def score(pipe: PODiffPipeline, lr: torch.Tensor, hr: torch.Tensor, sampler: str, steps: int, members: int) -> dict:
    t0 = time.perf_counter()
    out = pipe.sample(lr, num_samples=members, steps=steps, sampler=sampler, seed=0, return_samples=True)
    seconds = time.perf_counter() - t0
    return {"sampler": sampler, "steps": steps,
            "crps": metrics.crps_gaussian(out.mean, out.variance.clamp_min(0), hr),
            "crps_members_fair": metrics.crps_ensemble(out.samples, hr, fair=True),
            "rmse": metrics.rmse(out.mean, hr), "seconds_per_member": seconds / members}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="trained model folder")
    parser.add_argument("--dataset", required=True, help="packaged name (sst, mri, images) or data file")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    run = Path(args.run)
    pipe = PODiffPipeline.load(run / "model" if (run / "model").is_dir() else run)  # a train run or its model
    ds = data.load(args.dataset, pipe.config.scale)
    lr, hr, _ = ds.split("test")
    rows = []
    for sampler, steps in CONFIGS:
        rows.append(score(pipe, lr, hr, sampler, steps, args.num_samples))
        row = rows[-1]
        print(f"{sampler:>16} {steps:3d} steps: CRPS {row['crps']:.5g} ({row['crps'] / rows[0]['crps']:.3f}× "
              f"DDIM-50), members' CRPS {row['crps_members_fair']:.5g}, RMSE {row['rmse']:.5g}, "
              f"{row['seconds_per_member']:.3f} s/member", flush=True)
    write_json(args.out, {"run": args.run, "dataset": args.dataset, "test_fields": int(hr.shape[0]),
                          "members": args.num_samples, "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
