"""Packaging glue that pyproject.toml cannot express.

- triton_kernels/ is installed as ``fastlm.triton_kernels`` (no top-level name to clash with).
- csrc/ is installed as data under ``fastlm/_csrc`` so an installed fastlm can JIT-build.
- configs/ is installed as ``fastlm/_configs`` so model presets resolve by name anywhere.
- ``FASTLM_BUILD_OPS=1`` (with torch importable, i.e. ``pip install --no-build-isolation``)
  prebuilds the extensions ahead of time, like DeepSpeed's DS_BUILD_OPS; by default they are
  built just in time on first use and cached (see fastlm/_build.py).
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _csrc_package_data():
    files = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in {".cpp", ".cu", ".h", ".cuh", ".hpp"}]
    return [str(p.relative_to(ROOT / "csrc")) for p in files]


def _configs_package_data():
    return [str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*")
            if p.suffix in {".yaml", ".json"}]


def _prebuilt_extensions():
    if os.environ.get("FASTLM_BUILD_OPS") != "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("FASTLM_BUILD_OPS=1 needs torch importable: pip install --no-build-isolation .")
    sys.path.insert(0, str(ROOT))
    from fastlm import _build  # the same builders choose sources and flags

    exts = []
    cpu = _build.BUILDERS["cpu"]
    exts.append(CppExtension(
        cpu.prebuilt_module, [str(p.relative_to(ROOT)) for p in cpu.sources()],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=cpu.cflags(), extra_link_args=cpu.ldflags(),
    ))
    cuda = _build.BUILDERS["cuda"]
    if torch.version.cuda is not None and _build.nvcc_path() is not None:
        exts.append(CUDAExtension(
            cuda.prebuilt_module, [str(p.relative_to(ROOT)) for p in cuda.sources()],
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cuda.cflags(), "nvcc": cuda.cuda_cflags()},
        ))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _prebuilt_extensions()
setup(
    packages=find_packages(include=["fastlm", "fastlm.*"]) + [
        "fastlm.triton_kernels", "fastlm._csrc", "fastlm._configs"],
    package_dir={"fastlm.triton_kernels": "triton_kernels", "fastlm._csrc": "csrc",
                 "fastlm._configs": "configs"},
    package_data={"fastlm": ["py.typed"], "fastlm._csrc": _csrc_package_data(),
                  "fastlm._configs": _configs_package_data()},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
