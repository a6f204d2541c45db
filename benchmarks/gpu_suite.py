"""GPU readiness in one script: every op against its float64 reference, each kernel's achieved
bandwidth as a fraction of the measured device copy bandwidth, and the eigensolver against
``torch.linalg.eigh``.

    python benchmarks/gpu_suite.py                 # on a CUDA machine: full sizes, JSON to stdout
    python benchmarks/gpu_suite.py --dry-run       # anywhere: tiny sizes on CPU, same bookkeeping
    python benchmarks/gpu_suite.py --out gpu.json

Bytes moved are counted as the op's compulsory traffic (every input read once, every output
written once), so the fraction is a lower bound on how close a kernel is to the roofline.
``tests/benchmarks/test_gpu_suite.py`` runs the dry mode so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import podiff_kernels as pk
from podiff_kernels import dispatch, reference


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device, numel: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) for a large float32 tensor."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / seconds


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def cases(device, dry: bool):
    """(name, fn, reference_fn, inputs_and_outputs_for_bytes) per op."""
    B, C, H, p, s, r, M = (2, 1, 16, 4, 2, 4, 4) if dry else (8, 3, 512, 8, 4, 32, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, H, generator=g, dtype=torch.float64)
    D = C * p * p
    L = ((H - p) // s + 1) ** 2
    basis = torch.linalg.qr(torch.randn(D, r, generator=g, dtype=torch.float64))[0]
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    coeffs = torch.randn(B, L, r, generator=g, dtype=torch.float64)
    var = torch.rand(B, L, r, generator=g, dtype=torch.float64)
    samples = torch.randn(M, B, L, r, generator=g, dtype=torch.float64)
    cov = torch.einsum("mblk,mblj->blkj", samples, samples) / M  # SPD per token
    n_eig, batch_eig = (8, 16) if dry else (64, 4096)
    a = torch.randn(batch_eig, n_eig, n_eig, generator=g, dtype=torch.float64)
    a = a @ a.mT / n_eig
    f = lambda t: t.float().to(device)  # noqa: E731
    xd, bd, md, cd, vd, sd, ad, covd = map(f, (x, basis, mean, coeffs, var, samples, a, cov))
    size = (H, H)

    def stats_reference():  # pooled patch covariance, float64, by torch.cov on the patch matrix
        from podiff_kernels.reference.patches import extract_patches

        return torch.cov(extract_patches(x, p, s).reshape(-1, D).T)[None]

    return [
        ("patch_encode", lambda: pk.patch_encode(xd, bd, md, p, s),
         lambda: reference.patch_encode(x, basis, mean, p, s), (xd, bd, md), (B, L, r)),
        ("patch_decode", lambda: pk.patch_decode(cd, bd, md, size, p, s),
         lambda: reference.patch_decode(coeffs, basis, mean, size, p, s), (cd, bd, md), (B, C, H, H)),
        ("propagate_variance", lambda: pk.propagate_variance(vd, bd, size, p, s),
         lambda: reference.propagate_variance(var, basis, size, p, s), (vd, bd), (B, C, H, H)),
        ("decode_moments", lambda: pk.decode_moments(cd, covd, bd, md, size, p, s),
         lambda: (reference.patch_decode(coeffs, basis, mean, size, p, s),
                  reference.propagate_variance(cov, basis, size, p, s)), (cd, covd, bd, md), (2, B, C, H, H)),
        ("patch_correlate", lambda: pk.patch_correlate(xd, cd, p, s),
         lambda: reference.patch_correlate(x, coeffs, p, s), (xd, cd), (D, r)),
        ("patch_stats", lambda: pk.patch_stats(xd, p, s).covariance(),
         stats_reference, (xd,), (D, D)),
        ("ensemble_moments", lambda: pk.ensemble_moments(sd),
         lambda: reference.ensemble_moments(samples), (sd,), (B, L, r + r * r)),
        ("batched_eigh", lambda: pk.batched_eigh(ad)[0],
         lambda: reference.batched_eigh(a)[0], (ad,), (batch_eig, n_eig + n_eig * n_eig)),
    ]


def run(device: torch.device, dry: bool, repeats: int) -> dict:
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "dry_run": dry, "torch": torch.__version__, "ops": []}
    bandwidth = copy_bandwidth(device, (1 << 16) if dry else (1 << 28), repeats)
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    for name, fn, ref, inputs, out_shape in cases(device, dry):
        got, want = fn(), ref()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        err = max(float((a.double().cpu() - b.double()).abs().max() / b.abs().max().clamp_min(1e-30))
                  for a, b in zip(got, want, strict=False))
        seconds = best_time(fn, device, repeats)
        moved = nbytes(*inputs) + 4 * int(torch.tensor(out_shape).prod())
        choice = dispatch.last_choice.get(name)
        report["ops"].append({
            "op": name, "backend": choice.backend if choice else None, "max_rel_error": err,
            "ok": err < 1e-4, "seconds": seconds, "bytes": moved,
            "achieved_GBps": moved / seconds / 1e9, "fraction_of_copy": moved / seconds / bandwidth,
        })
    n, batch = (8, 16) if dry else (64, 4096)
    a = torch.randn(batch, n, n, device=device)
    a = a @ a.mT / n
    ours = best_time(lambda: pk.batched_eigh(a), device, repeats)
    theirs = best_time(lambda: torch.linalg.eigh(a), device, repeats)
    report["eigh"] = {"batch": batch, "n": n, "ours_s": ours, "torch_s": theirs, "speedup": theirs / ours,
                      "backend": dispatch.last_choice["batched_eigh"].backend}
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the bookkeeping")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    report = run(device, args.dry_run, 2 if args.dry_run else args.repeats)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    return 0 if all(op["ok"] for op in report["ops"]) else 1


if __name__ == "__main__":
    sys.exit(main())
