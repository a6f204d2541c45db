"""Mutation check: plant one bug at a time, run the fast tests that guard it, restore the file.

    python tests/mutations.py        # prints CAUGHT / MISSED per mutation; exit 1 if any is missed

A test suite is only as good as the bugs it catches: each mutation here is a plausible slip in a
kernel or its chunking, and the fast run must fail on every one. Not collected by pytest.
"""
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MUTATIONS = [
    ("patch_stats Triton kernel: pairwise M2 uses sy_ij twice",
     "podiff_kernels/ops/patch_stats.py", "syy - tl.where(has, sy_ij * sy_ji / safe, 0.0)",
     "syy - tl.where(has, sy_ij * sy_ij / safe, 0.0)", ["tests/kernels/test_patch_stats.py"]),
    ("patch_stats Triton kernel: complete-case drops the completeness weight",
     "podiff_kernels/ops/patch_stats.py", "wi = mi.to(tl.float64) * whole[:, None]",
     "wi = mi.to(tl.float64)", ["tests/kernels/test_patch_stats.py"]),
    ("patch_decode torch path: local basis fold misses the last location row",
     "podiff_kernels/ops/patch_decode.py", "l0, l1 = r0 * grid.n_cols, r1 * grid.n_cols",
     "l0, l1 = r0 * grid.n_cols, max(r0 + 1, r1 - 1) * grid.n_cols if r1 - r0 > 1 else r1 * grid.n_cols",
     ["tests/kernels/test_patch_decode.py"]),
    ("patch_decode Triton kernel: average divides by the row count only",
     "podiff_kernels/ops/patch_decode.py", "acc = acc / tl.where(pix_ok, ny * nx, 1).to(ACC)",
     "acc = acc / tl.where(pix_ok, ny, 1).to(ACC)", ["tests/kernels/test_patch_decode.py"]),
    ("ensemble_moments torch path: the scratch chunk is the whole input",
     "podiff_kernels/ops/ensemble_moments.py", "return max(1, min(tokens, budget // per_token))",
     "return tokens", ["tests/kernels/test_ensemble_moments.py"]),
]
missed = 0
for name, rel, old, new, tests in MUTATIONS:
    path = ROOT / rel
    text = path.read_text()
    assert text.count(old) == 1, (name, text.count(old))
    path.write_text(text.replace(old, new))
    try:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           cwd=ROOT, capture_output=True, text=True)
        last = [loc for loc in r.stdout.splitlines() if loc.strip()][-1]
        missed += r.returncode == 0
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'} ({last}; {time.time()-t0:.0f} s)", flush=True)
    finally:
        path.write_text(text)
sys.exit(1 if missed else 0)
