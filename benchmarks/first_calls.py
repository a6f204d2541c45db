"""What the first calls of an op cost in a fresh process, beside its baseline's first calls.

A user's script calls ``propagate_variance`` a handful of times, not fifty: a benchmark that times
warm rounds hides what the first calls pay (imports, op registration, dispatch, allocator). Each
provider runs in its own fresh interpreter, the two alternating, ``--repeats`` times; the table
gives the median of the first ``--calls`` calls of each and the ratio, and the first call alone.
Shapes are ``test_uncertainty.py``'s (B = 4, 256², p = 8, r = 16, the covariance of 64 members).

    python benchmarks/first_calls.py [--calls 7] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SETUP = """
import time, torch, torch.nn.functional as F
import podiff_kernels as pk
M, B, C, H, p, r = 64, 4, 1, 256, 8, 16
L, D = (H // p) ** 2, C * p * p
g = torch.Generator().manual_seed(0)
basis = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0].float()
_, cov = pk.ensemble_moments(torch.randn(M, B, L, r, generator=g))

def einsum_fold():
    per_patch = torch.einsum("dk,blkm,dm->bld", basis, cov, basis)
    n = F.fold(torch.ones(1, D, L), (H, H), p, stride=p)
    return F.fold(per_patch.transpose(1, 2), (H, H), p, stride=p) / n**2

def podiff():
    return pk.propagate_variance(cov, basis, (H, H), p)
"""

CALL = """
times = []
for _ in range({calls}):
    start = time.perf_counter()
    {provider}()
    times.append((time.perf_counter() - start) * 1e3)
print(json.dumps(times))
"""


def first_calls(provider: str, calls: int) -> list[float]:
    code = "import json\n" + SETUP + CALL.format(calls=calls, provider=provider)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    runs = {"podiff": [], "einsum_fold": []}
    for _ in range(args.repeats):
        for provider in runs:  # alternating, so that load on the machine falls on both
            runs[provider].append(first_calls(provider, args.calls))
    print(f"propagate_variance block, B4 C1 256² p8 r16, fresh processes ({args.repeats} each), first "
          f"{args.calls} calls")
    print("| provider | first call (ms, median over processes) | median of the first calls (ms) |")
    print("|---|---|---|")
    medians = {}
    for provider, times in runs.items():
        first = statistics.median(t[0] for t in times)
        medians[provider] = statistics.median(statistics.median(t) for t in times)
        print(f"| {provider} | {first:.1f} | {medians[provider]:.1f} |")
    print(f"\nspeed-up over the first calls (einsum_fold / podiff): {medians['einsum_fold'] / medians['podiff']:.1f}x")


if __name__ == "__main__":
    main()
