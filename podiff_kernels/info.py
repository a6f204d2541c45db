"""``python -m podiff_kernels.info``: versions, the backend each op uses here and why, the extension cache.

``--json`` prints the same as JSON. Nothing is built or launched.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from . import __version__, _extension, _triton
from .dispatch import backends, forced


def collect() -> dict:
    ok, why = _extension.status()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - platform dependent
        triton_version = None
    return {
        "versions": {
            "podiff_kernels": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": triton_version,
        },
        "devices": {
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(),
        },
        "triton": {
            "importable": _triton.HAS_TRITON,
            "interpreter": _triton.INTERPRETED,
            "error": _triton.IMPORT_ERROR or None,
        },
        "extension": {
            "usable": ok,
            "status": why,
            "cache_dir": str(_extension.cache_dir()),
            "sources": str(_extension.CSRC),
        },
        "forced_backend": forced(),
        "ops": backends(),
    }


def _print(info: dict) -> None:
    v = info["versions"]
    print(f"podiff_kernels {v['podiff_kernels']}  python {v['python']}  torch {v['torch']} "
          f"(cuda {v['torch_cuda'] or 'none'})  triton {v['triton'] or 'not installed'}")
    d = info["devices"]
    gpus = ", ".join(d["cuda_devices"]) or "none"
    print(f"devices: CPU ({d['cpu_threads']} threads); CUDA: {gpus}")
    t = info["triton"]
    print(f"triton: {'importable' if t['importable'] else 'unavailable: ' + str(t['error'])}"
          f"{', interpreter mode (TRITON_INTERPRET=1)' if t['interpreter'] else ''}")
    e = info["extension"]
    print(f"C++ extension: {'usable' if e['usable'] else 'unusable'} - {e['status']}")
    print(f"  cache: {e['cache_dir']}\n  sources: {e['sources']}")
    if info["forced_backend"]:
        print(f"PODIFF_BACKEND={info['forced_backend']} (forced)")
    print("ops:")
    for op, cases in info["ops"].items():
        for case, c in cases.items():
            print(f"  {op:<16} {case:<13} -> {str(c['backend']):<9} {c['reason']}")
            for name, why in c["rejected"].items():
                print(f"  {'':<16} {'':<13}    not {name}: {why}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m podiff_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
