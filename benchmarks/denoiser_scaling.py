"""How the denoiser's cost grows with the domain: one training step (forward and backward, one
field) and one sampling call (forward, one member) of the ``tiny`` ViT with windowed attention
(the default) — and with global attention where it fits — on the token grid of square fields from
128² to 2048² pixels (p = 4), each in a fresh process: median time of 3 calls and the process's
resident high-water mark over them (what ``top`` shows), with the growth exponent of time in the
area fitted over the sizes from 256² up.

    python benchmarks/denoiser_scaling.py --out scaling.json

The training step stops at ``--train-max`` pixels a side (memory: the activations of every block
are kept for the backward pass), global attention at ``--global-max``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

CHILD = """
import json, statistics, sys, time, torch
from podiff.diffusion.denoiser import DenoiserConfig, PODDenoiser
side, window, train = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "train"
grid = (side // 4, side // 4)
L = grid[0] * grid[1]
torch.manual_seed(0)
net = PODDenoiser(DenoiserConfig.preset("tiny", rank=8, grid=grid, cond_rank=8, window=window))
x, c, t = torch.randn(1, L, 8), torch.randn(1, L, 8), torch.rand(1)
def rss(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) * 1024
def call():
    if train:
        net(x, c, t).square().mean().backward()
        net.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            net(x, c, t)
before = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
times = []
for _ in range(3):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(times), "peak_rss_mb": (rss("VmHWM:") - before) / 2**20}))
"""


def measure(side: int, window: int, train: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(side), str(window), "train" if train else "sample"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{side}² window {window}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def exponent(rows: list[dict]) -> float | None:
    """Least-squares slope of log(seconds) against log(area) over the sides >= 256."""
    pts = [(math.log(r["side"] ** 2), math.log(r["seconds"])) for r in rows if r["side"] >= 256]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="128,256,512,1024,2048", help="field sides in pixels")
    parser.add_argument("--train-max", type=int, default=1024)
    parser.add_argument("--global-max", type=int, default=512)
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args(argv)
    sides = [int(s) for s in args.sides.split(",")]
    runs = {}
    for kind in ("sample", "train"):
        for label, window, limit in (("window 8", 8, None), ("global", 0, args.global_max)):
            rows = []
            for side in sides:
                if (limit and side > limit) or (kind == "train" and side > args.train_max):
                    continue
                row = {"side": side, "tokens": (side // 4) ** 2, **measure(side, window, kind == "train")}
                rows.append(row)
                per_pixel = row["seconds"] / side**2 * 1e9
                print(f"{kind:6s} {label:8s} {side:5d}²: {row['seconds']:.3f} s ({per_pixel:.1f} ns/pixel), "
                      f"peak RSS +{row['peak_rss_mb']:.0f} MiB", flush=True)
            runs[f"{kind} {label}"] = {"rows": rows, "time_exponent": exponent(rows)}
            print(f"{kind} {label}: time ∝ area^{runs[f'{kind} {label}']['time_exponent']}", flush=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
