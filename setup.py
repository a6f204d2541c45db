"""Build hooks beside pyproject.toml.

- Wheels carry ``csrc/`` inside ``podiff_kernels`` so the extension can build on first use.
- ``PODIFF_BUILD_EXT=1 pip install -e . --no-build-isolation`` builds the C++ (and, on a
  CUDA build of torch, CUDA) extension ahead of time as ``podiff_kernels._C``.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "podiff_kernels" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / "csrc").glob("*"):
            if src.is_file():
                shutil.copy2(src, dst / src.name)


def _ahead_of_time_extension():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("_podiff_ext_cfg", ROOT / "podiff_kernels" / "_extension.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    sources = [str(p.relative_to(ROOT)) for p in cfg._sources()]
    flags = list(cfg.CXX_FLAGS) + [f'-DPODIFF_BUILD_HASH="{cfg.build_hash()}"']
    if cfg._with_cuda():
        flags.append("-DPODIFF_WITH_CUDA")
    kind = CUDAExtension if cfg._with_cuda() else CppExtension
    ext = kind(
        "podiff_kernels._C",
        sources,
        extra_compile_args={"cxx": flags, "nvcc": list(cfg.NVCC_FLAGS)} if cfg._with_cuda() else flags,
        extra_link_args=list(cfg.LD_FLAGS),
    )
    return [ext], {"build_ext": BuildExtension}


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("PODIFF_BUILD_EXT", "0") == "1":
    ext_modules, extra = _ahead_of_time_extension()
    cmdclass.update(extra)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
