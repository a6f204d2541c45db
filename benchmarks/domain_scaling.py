"""A model of any domain, trained on crops, sampling fields far larger than it saw: sampling time per
member and pixel and the process's peak memory against the domain's area (issue 33's target: a
model trained on 64 × 64-pixel crops samples a 2048² field in under 4 GB, with time per pixel from
256² to 2048² growing by at most 1.5×).

The model: ``PipelineConfig(domain="any", crop=16)`` (16 × 16 tokens of 4 × 4 pixels: 64 × 64-pixel
crops), the default ``tiny`` denoiser with 8-token attention windows, a shared ridge mean, trained
for ``--steps`` on smooth random 128² fields. Each size samples ``--members`` members of one field
with the default sampler in a fresh process, after one sample of a 64² field (the process's
one-time costs: the first call of a custom op imports ``torch._dynamo``): wall time of
``PODiffPipeline.sample`` (the ridge, the condition, the chain, the closed-form moments) and the
process's resident high-water mark (``VmHWM``, what a user's ``top`` shows at its worst, torch's
own footprint included).

    python benchmarks/domain_scaling.py --out domain_scaling.json
    python benchmarks/domain_scaling.py --device cuda --out domain_scaling_gpu.json   # + peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

CHILD = """
import json, sys, time, torch
import torch.nn.functional as F
from podiff import PODiffPipeline
model, side, members, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(1)
def rss(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) * 1024
pipe = PODiffPipeline.load(model, device=device)
cuda = pipe.device.type == "cuda"
def sync():
    if cuda:
        torch.cuda.synchronize()
hr = F.avg_pool2d(torch.randn(1, 1, side + 8, side + 8), 9, stride=1) * 3
lr = F.avg_pool2d(hr, pipe.config.scale).to(pipe.device)
t0 = time.perf_counter()
pipe.sample(lr[..., :16, :16], num_samples=members, seed=0)  # the process's one-time costs, once
sync()
first = time.perf_counter() - t0
before = rss("VmRSS:")
if cuda:
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
out = pipe.sample(lr, num_samples=members, seed=0)
sync()
seconds = time.perf_counter() - t0
assert bool(torch.isfinite(out.mean).all()) and bool((out.variance >= 0).all())
print(json.dumps({"seconds": seconds, "warm_up_seconds": first, "seconds_per_member": seconds / members,
                  "peak_rss_mb": rss("VmHWM:") / 2**20,
                  "added_rss_mb": (rss("VmHWM:") - before) / 2**20,
                  "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))
"""


def train(directory: Path, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from podiff import PipelineConfig, PODiffPipeline
    from podiff.fitting import fit

    g = torch.Generator().manual_seed(0)
    hr = F.avg_pool2d(torch.randn(24, 1, 136, 136, generator=g), 9, stride=1) * 3
    lr = F.avg_pool2d(hr, 4)
    pipe = PODiffPipeline(PipelineConfig(domain="any", crop=16, residual="ridge", train_steps=steps))
    t0 = time.perf_counter()
    fit(pipe, lr, hr, progress=False)
    seconds = time.perf_counter() - t0
    pipe.save(directory)
    return seconds


def measure(model: Path, side: int, members: int, device: str = "cpu") -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(side), str(members), device],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{side}²: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="256,512,1024,2048", help="field sides in pixels")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="training steps of the crop-trained model")
    parser.add_argument("--device", default="cpu", help="where the model samples (cpu, cuda); it trains on the CPU")
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        train_seconds = train(model, args.steps)
        print(f"trained on 64×64-pixel crops of 128² fields: {args.steps} steps in {train_seconds:.0f} s", flush=True)
        rows = []
        for side in (int(s) for s in args.sides.split(",")):
            row = {"side": side, **measure(model, side, args.members, args.device)}
            row["ns_per_member_pixel"] = row["seconds_per_member"] / side**2 * 1e9
            rows.append(row)
            print(f"{side:5d}²: {row['seconds_per_member']:.2f} s per member ({row['ns_per_member_pixel']:.0f} ns "
                  f"per member pixel), peak RSS {row['peak_rss_mb']:.0f} MiB (+{row['added_rss_mb']:.0f} MiB "
                  f"sampling)", flush=True)
    per_pixel = [r["ns_per_member_pixel"] for r in rows]
    growth = per_pixel[-1] / per_pixel[0] if rows else None
    slope = None
    if len(rows) >= 2:  # least squares of log time against log area, over every size
        import numpy as np

        slope = float(np.polyfit([2 * math.log(r["side"]) for r in rows],
                                 [math.log(r["seconds_per_member"]) for r in rows], 1)[0])
        print(f"time per pixel, largest over smallest: {growth:.2f}×; time ∝ area^{slope:.2f}")
    Path(args.out).write_text(json.dumps({"machine": machine(), "device": args.device, "members": args.members,
                                          "train_steps": args.steps,
                                          "train_seconds": train_seconds, "rows": rows,
                                          "per_pixel_growth": growth, "time_exponent": slope}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
