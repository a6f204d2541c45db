"""Every GPU kernel through the real compiler, without a GPU.

    python -m podiff_kernels.compile_check [--arch sm_80,sm_86,sm_90] [--json FILE] [--quick]

1. Runs every op that has a Triton kernel — forward and backward, every dtype it dispatches
   to Triton (float32, float64, float16, bfloat16), shared and local bases, with and without a
   mean, with and without overlap — over a sweep of shapes that includes the demos' and the
   benchmarks', inside ``capture_launches()``: the launchers pick their block sizes and
   ``num_warps`` as they would on a GPU, and each launch is recorded instead of run. The
   configurations therefore come from the launchers themselves, so a change to a launcher is
   checked here.
2. Compiles each distinct configuration with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))``, with the argument specialisation Triton's own
   binder computes for those arguments, and reads the ``ptxas -v`` log of the PTX (registers,
   stack frame, spill stores and loads) beside the dynamic shared memory Triton will request.
3. Compiles ``csrc/eigh_cuda.cu`` to cubin for the same architectures with ``nvcc``.

It fails (exit 1) where a configuration does not compile, spills, or needs more shared memory
than the architecture gives one block; it reports the theoretical occupancy of each.
Must run with ``TRITON_INTERPRET`` unset: the interpreter replaces the kernels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

# Triton's current default (FP fusion on), said explicitly: the same code the runtime compiles.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@dataclass(frozen=True)
class Arch:
    """Per-block and per-SM limits (CUDA C Programming Guide, compute capabilities table)."""

    name: str
    capability: int
    smem_per_block: int  # opt-in maximum of dynamic shared memory per block
    smem_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    reserved_smem_per_block: int = 1024


ARCHS = {
    "sm_80": Arch("sm_80", 80, 166912, 167936, 64, 32),  # A100
    "sm_86": Arch("sm_86", 86, 101376, 102400, 48, 16),  # consumer Ampere (and Ada's sm_89 limits)
    "sm_90": Arch("sm_90", 90, 232448, 233472, 64, 32),  # H100 / H200
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# 1. What the launchers launch
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """One patch geometry of the sweep: ``batch × C × H × W``, patch ``p``, stride ``s``, rank ``r``."""

    label: str
    batch: int
    channels: int
    height: int
    width: int
    patch: int
    stride: int
    rank: int


# The demos (SST 16×432 local p4; MRI 128² p8; images 64² crops p8, grey and RGB), the
# benchmarks (256² p8 r16 batch 4, pixel-space p8/p16 ranks 64/256, the 1024² encode), overlap
# (s < p), tiny and odd shapes, and one member of a sampling chunk.
SWEEP = (
    Geometry("sst-demo", 8, 1, 16, 432, 4, 4, 13),
    Geometry("sst-overlap", 2, 1, 16, 432, 4, 2, 13),
    Geometry("mri-demo", 4, 1, 128, 128, 8, 8, 40),
    Geometry("images-demo", 8, 1, 64, 64, 8, 8, 24),
    Geometry("images-rgb", 4, 3, 64, 64, 8, 4, 48),
    Geometry("bench-256", 4, 1, 256, 256, 8, 8, 16),
    Geometry("bench-overlap", 4, 1, 256, 256, 8, 4, 16),
    Geometry("pixel-p8", 2, 1, 64, 64, 8, 8, 64),
    Geometry("pixel-p16", 2, 1, 64, 64, 16, 16, 256),
    Geometry("bench-1024", 1, 1, 1024, 1024, 8, 8, 16),
    Geometry("odd", 3, 2, 21, 13, 5, 4, 7),
    Geometry("one-patch", 1, 1, 8, 8, 8, 8, 3),
)
QUICK = (SWEEP[0], SWEEP[3])
MEMBERS = (16, 64)  # ensemble sizes of the demos and the uncertainty benchmark


def _case_launches(g: Geometry, dtype: torch.dtype, local: bool, with_mean: bool, members: int):
    """Calls every op with a Triton kernel (and the backward passes) for one case."""
    import podiff_kernels as pk
    from podiff_kernels._geometry import make_grid
    from podiff_kernels.ops.patch_encode_masked import MAX_TRITON_RANK

    grid = make_grid(g.channels, g.height, g.width, g.patch, g.stride)
    L, D, r = grid.num_locations, grid.patch_dim, min(g.rank, grid.patch_dim)
    x = torch.zeros(g.batch, g.channels, g.height, g.width, dtype=dtype, requires_grad=True)
    basis = torch.zeros((L, D, r) if local else (D, r), dtype=dtype, requires_grad=True)
    mean = torch.zeros((L, D) if local else (D,), dtype=dtype) if with_mean else None
    coeffs = pk.patch_encode(x, basis, mean, g.patch, g.stride)
    coeffs.sum().backward()  # patch_decode (sum, the adjoint) and patch_correlate
    if r <= MAX_TRITON_RANK:  # wider ranks dispatch to the torch solve
        gaps = torch.ones(1, g.channels, g.height, g.width, dtype=torch.bool)
        pk.patch_encode(x.detach(), basis.detach(), mean, g.patch, g.stride, mask=gaps)  # gappy POD
    holes = torch.ones(1, g.channels, g.height, g.width, dtype=torch.bool)
    holes[..., 0, 0] = False  # one masked pixel: the pairwise and complete-case statistics
    for mask, complete in ((None, False), (holes, False), (holes, True)):
        pk.patch_stats(x.detach(), g.patch, g.stride, local=local, mask=mask, complete=complete)
    tokens = torch.zeros(g.batch, L, r, dtype=dtype, requires_grad=True)
    pk.patch_decode(tokens, basis, mean, (g.height, g.width), g.patch, g.stride).sum().backward()
    samples = torch.zeros(members, g.batch, L, r, dtype=dtype)
    for diagonal in (False, True):
        mean_tok, cov = pk.ensemble_moments(samples, diagonal=diagonal)
        pk.decode_moments(mean_tok, cov, basis.detach(), mean, (g.height, g.width), g.patch, g.stride)
        pk.propagate_variance(cov, basis.detach(), (g.height, g.width), g.patch, g.stride)


def capture(geometries=SWEEP, dtypes=DTYPES, members=MEMBERS) -> list:
    """The launches of the whole sweep, one per distinct compiled configuration."""
    from podiff_kernels import _triton

    os.environ["PODIFF_BACKEND"] = "triton"
    launches, seen = [], set()
    try:
        with _triton.capture_launches() as captured:
            for g in geometries:
                for dtype in dtypes:
                    for local in (False, True):
                        for with_mean in (False, True):
                            for m in members:
                                _case_launches(g, dtype, local, with_mean, m)
                                for launch in captured:
                                    key = _config_key(launch)
                                    if key not in seen:
                                        seen.add(key)
                                        launches.append((key, launch, g.label))
                                captured.clear()
    finally:
        os.environ.pop("PODIFF_BACKEND", None)
    return launches


def _bind(launch, arch: Arch):
    """Triton's own binder: signature, constexprs, attributes and options for these arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return target, options, signature, constexprs, attrs


def _config_key(launch) -> str:
    _, options, signature, constexprs, attrs = _bind(launch, ARCHS["sm_90"])
    parts = (launch.name, sorted(signature.items()), sorted((str(k), str(v)) for k, v in constexprs.items()),
             sorted((str(k), str(v)) for k, v in attrs.items()), options.num_warps, options.num_stages)
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def describe(launch) -> dict:
    """The configuration in words: dtype, constexprs (block sizes, flags) and num_warps."""
    kw = {k: v for k, v in launch.kwargs.items() if not hasattr(v, "dtype")}
    dtype = next(str(a.dtype).replace("torch.", "") for a in launch.args if isinstance(a, torch.Tensor))
    flags = {k: (v if isinstance(v, (int, bool, str)) else str(v)) for k, v in kw.items()}
    flags.setdefault("num_warps", 4)
    return {"dtype": dtype, **flags}


# ----------------------------------------------------------------------------------------------
# 2. Compile and read the resource usage
# ----------------------------------------------------------------------------------------------
_PTXAS_LINE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_usage(ptx: str, arch: Arch) -> dict:
    """``ptxas -v`` on the PTX Triton made, with Triton's own ptxas and flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch.capability).path
    gpu_name = sm_arch_from_capability(arch.capability)  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()[-500:]}")
    usage = {}
    for key, pattern in _PTXAS_LINE.items():
        found = pattern.findall(run.stderr)
        usage[key] = max(int(v) for v in found) if found else 0
    return usage


def occupancy(arch: Arch, registers: int, shared: int, num_warps: int) -> float:
    """Theoretical occupancy (active warps / the SM's maximum) from registers, shared memory, warps."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = arch.regs_per_sm // (regs_per_warp * num_warps)
    by_smem = arch.smem_per_sm // (shared + arch.reserved_smem_per_block) if shared else arch.max_blocks_per_sm
    by_warps = arch.max_warps_per_sm // num_warps
    blocks = min(by_regs, by_smem, by_warps, arch.max_blocks_per_sm)
    return blocks * num_warps / arch.max_warps_per_sm


_JOBS: list = []  # (key, launch, label, arch): forked workers read it, so no kernel is pickled


def compile_one(index: int) -> dict:
    """Compiles job ``_JOBS[index]`` (one configuration for one architecture); never raises."""
    import triton
    from triton.compiler import ASTSource

    key, launch, label, arch_name = _JOBS[index]
    arch = ARCHS[arch_name]
    row = {"kernel": launch.name, "config": describe(launch), "key": key, "first_seen": label, "arch": arch_name}
    t0 = time.perf_counter()
    try:
        target, options, signature, constexprs, attrs = _bind(launch, arch)
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        usage = _ptxas_usage(compiled.asm["ptx"], arch)
        shared = int(compiled.metadata.shared)
        warps = int(compiled.metadata.num_warps)
        problems = []
        if usage["spill_stores"] or usage["spill_loads"]:
            problems.append(f"spills ({usage['spill_stores']} B stores, {usage['spill_loads']} B loads)")
        if shared > arch.smem_per_block:
            problems.append(f"shared memory {shared} B > {arch.smem_per_block} B per block")
        row.update(usage, shared_bytes=shared, num_warps=warps,
                   occupancy=round(occupancy(arch, usage["registers"], shared, warps), 3),
                   ok=not problems, problem="; ".join(problems) or None)
    except Exception as exc:  # a configuration that does not compile is a finding, not a crash
        row.update(ok=False, problem=f"does not compile: {type(exc).__name__}: {str(exc).strip()[:400]}")
    row["compile_seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------------
# 3. The CUDA eigensolver with nvcc
# ----------------------------------------------------------------------------------------------
def eigh_smem_limit_n(arch: Arch) -> int:
    """Largest n whose Jacobi working set fits one block's shared memory (dispatch's own formula)."""
    from podiff_kernels.ops.eigh import _smem_bytes

    n = 1
    while _smem_bytes(n + 1) <= arch.smem_per_block:
        n += 1
    return n


def compile_eigh(arch: Arch, nvcc: str | None = None) -> dict:
    """``nvcc -cubin`` of ``csrc/eigh_cuda.cu`` with ``-Xptxas -v``: per kernel registers and spills."""
    nvcc = nvcc or shutil.which("nvcc")
    csrc = HERE / "csrc" if (HERE / "csrc").is_dir() else HERE.parent / "csrc"
    row = {"kernel": "jacobi_eigh_kernel (csrc/eigh_cuda.cu)", "arch": arch.name,
           "max_n_in_shared_memory": eigh_smem_limit_n(arch)}
    if nvcc is None:
        row.update(ok=False, problem="nvcc not found (put the CUDA toolkit's bin on PATH)")
        return row
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([nvcc, "-cubin", f"-arch={arch.name}", "-O3", "-Xptxas", "-v", "-I", str(csrc),
                              str(csrc / "eigh_cuda.cu"), "-o", str(Path(tmp) / "eigh.cubin")],
                             capture_output=True, text=True)
    if run.returncode:
        row.update(ok=False, problem=f"nvcc failed: {run.stderr.strip()[-600:]}")
        return row
    kernels = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", run.stderr):
        name = re.search(r"Compiling entry function '(\w+)'", block)
        if not name:
            continue
        usage = {key: max([int(v) for v in p.findall(block)] or [0]) for key, p in _PTXAS_LINE.items()}
        kernels[name.group(1)] = usage
    if not kernels:
        row.update(ok=False, problem=f"no ptxas report in nvcc's output: {run.stderr[-300:]}")
        return row
    spills = {k: u for k, u in kernels.items() if u["spill_stores"] or u["spill_loads"]}
    row.update(instantiations=kernels, registers=max(u["registers"] for u in kernels.values()),
               spill_stores=max(u["spill_stores"] for u in kernels.values()),
               spill_loads=max(u["spill_loads"] for u in kernels.values()),
               ok=not spills, problem=f"spills in {sorted(spills)}" if spills else None)
    return row


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def run(archs=("sm_80", "sm_86", "sm_90"), quick: bool = False, workers: int | None = None,
        progress: bool = True) -> dict:
    """Captures, compiles and checks; returns the report (``report["ok"]`` is the verdict)."""
    from podiff_kernels import _triton

    if not _triton.HAS_TRITON:
        raise RuntimeError(f"triton does not import: {_triton.IMPORT_ERROR}")
    if _triton.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 replaces the kernels with the interpreter; run with it unset")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"--arch must be among {sorted(ARCHS)}; got {unknown}")
    t0 = time.perf_counter()
    launches = capture(QUICK if quick else SWEEP, (torch.float32,) if quick else DTYPES,
                       MEMBERS[:1] if quick else MEMBERS)
    _JOBS[:] = [(key, launch, label, arch) for arch in archs for key, launch, label in launches]
    workers = workers or min(len(_JOBS), os.cpu_count() or 1)
    if progress:
        print(f"compile_check: {len(launches)} configurations x {len(archs)} architectures", file=sys.stderr)
    indices = range(len(_JOBS))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(compile_one, indices, chunksize=1))
    else:
        rows = [compile_one(i) for i in indices]
    eigh = [compile_eigh(ARCHS[a]) for a in archs]
    failures = [r for r in rows + eigh if not r["ok"]]
    return {"archs": list(archs), "quick": quick, "configurations": len(launches), "compiled": len(rows),
            "triton": _triton.triton.__version__, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
            "ok": not failures, "failures": failures, "triton_kernels": rows, "eigh": eigh}


def summary_table(report: dict) -> str:
    """Markdown: per kernel and architecture, the configurations and their worst resource figures."""
    lines = ["| kernel | arch | configs | registers (max) | spills | stack (max B) | shared (max B) | occupancy "
             "(min–max) |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in report["triton_kernels"]:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rows in sorted(groups.items()):
        good = [r for r in rows if "registers" in r]
        if not good:
            lines.append(f"| `{kernel}` | {arch} | {len(rows)} | — | does not compile | — | — | — |")
            continue
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in good)
        occ = [r["occupancy"] for r in good]
        lines.append(f"| `{kernel}` | {arch} | {len(rows)} | {max(r['registers'] for r in good)} | "
                     f"{'none' if not spills else f'{spills} B'} | {max(r['stack_bytes'] for r in good)} | "
                     f"{max(r['shared_bytes'] for r in good)} | {min(occ):.2f}–{max(occ):.2f} |")
    for e in report["eigh"]:
        lines.append(f"| `jacobi_eigh_kernel` (nvcc) | {e['arch']} | {len(e.get('instantiations', {}))} | "
                     f"{e.get('registers', '—')} | {'none' if e['ok'] else e['problem']} | — | "
                     f"n ≤ {e['max_n_in_shared_memory']} fits | — |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m podiff_kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_80,sm_86,sm_90", help="comma-separated: " + ", ".join(ARCHS))
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--quick", action="store_true", help="float32, two shapes: a few configurations")
    parser.add_argument("--workers", type=int, default=None, help="parallel compilations (default: cores)")
    args = parser.parse_args(argv)
    archs = tuple(a.strip() for a in args.arch.split(",") if a.strip())
    try:
        report = run(archs, quick=args.quick, workers=args.workers)
    except (RuntimeError, ValueError) as exc:
        print(f"compile_check: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, path)  # never a half-written report
    print(summary_table(report))
    print(f"\n{report['configurations']} configurations, {report['compiled']} compilations, "
          f"{len(report['failures'])} failures, {report['seconds']} s")
    for f in report["failures"]:
        print(f"FAIL {f['kernel']} {f['arch']} {f.get('config', '')}: {f['problem']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
