"""Build fastlm's CUDA kernels for the CUDA emulator (csrc/emu): ``torch.ops.fastlm_cuda_emu``.

For tests on machines without a GPU. The sources of the real CUDA extension (csrc/cuda/*.cu
and the csrc/bindings/cuda_*.cpp bindings, unchanged) are compiled by the host C++ compiler
against csrc/emu's stand-ins for the CUDA headers; a ``.cu`` file needs two mechanical edits
first, made here on a copy, because they are not C++:

- ``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``::emu::launch(kernel, grid, block,
  smem, stream)(args)``;
- ``extern __shared__ ... name[];`` (dynamic shared memory) becomes a pointer to the block's
  emulated shared memory, and ``__shared__ T name[N];`` a reference to an array the runtime
  keeps per declaration, fresh (NaN bytes) for every block.

The ops take CPU tensors and have the CUDA ops' schemas, so the ``cuda`` backend's whole path
below Python (binding checks, parameter packing, launch configuration, kernels) runs as it
would on a GPU. What emulation cannot show: speed, races the hardware would expose (threads
run one at a time, switching only at barriers), and the tensor cores' summation order.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastlm._build import ExtensionBuilder, ExtensionBuildError, cxx_compiler

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<")
# __shared__ T name[N]...; (a static one: the same block-fresh memory for a block's threads)
_STATIC_SMEM = re.compile(
    r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
_DYNAMIC_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")


def translate(source: str, name: str) -> str:
    """A .cu file's text as C++ for the emulator (see the module docstring)."""
    text, launches = _LAUNCH.subn(r"::emu::launch(\1, ", source)
    text = text.replace(">>>(", ")(")
    if text.count(">>>") or launches != source.count("<<<"):
        raise ExtensionBuildError(f"{name}: a kernel launch the emulator's translator does not parse")
    text = _DYNAMIC_SMEM.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_smem());", text)
    if re.search(r"extern\s+__shared__", text):
        raise ExtensionBuildError(f"{name}: a dynamic shared memory declaration the translator does not parse")
    sites = iter(range(1 << 30))
    text = _STATIC_SMEM.sub(
        lambda m: (f"{m[1]} (&{m[2]}){m[3]} = *reinterpret_cast<{m[1]} (*){m[3]}>("
                   f'::emu::static_smem("{name}:{next(sites)}", sizeof({m[1]}{m[3]})));'), text)
    if "__shared__" in text:
        raise ExtensionBuildError(f"{name}: a static shared memory declaration the translator does not parse")
    # #line keeps compiler errors pointing at the original file
    return f'#include "emu/device.h"\n#line 1 "{name}"\n{text}'


class CudaEmuBuilder(ExtensionBuilder):
    def __init__(self) -> None:
        super().__init__(
            name="cuda_emu",
            prebuilt_module="fastlm._C_cuda_emu_never_prebuilt",
            library_namespace="fastlm_cuda_emu",
            source_globs=("cuda/*.cu", "bindings/cuda_*.cpp", "emu/*.cpp"),
        )

    def incompatible_reason(self) -> str | None:
        import platform
        import shutil

        if platform.system() != "Linux":
            return "the CUDA emulator runs on Linux only (ucontext fibers)"
        if shutil.which(cxx_compiler()) is None:
            return f"no C++ compiler found (looked for '{cxx_compiler()}')"
        return None

    def cflags(self) -> list[str]:
        # fp-contract off: the kernels' __f*_rn intrinsics must stay single IEEE operations.
        return ["-O2", "-ffp-contract=off", "-DFASTLM_CUDA_EMU"]

    def sources(self) -> list[Path]:
        root = self.source_root()
        return sorted({p for pattern in self.source_globs for p in root.glob(pattern)})

    def include_paths(self) -> list[str]:
        root = self.source_root()
        return [str(root / "emu"), str(root)]  # emu/ first: its cuda_runtime.h, mma.h, ...

    def build_sources(self, build_dir: Path) -> list[str]:
        root = self.source_root()
        gen = build_dir / "translated"
        gen.mkdir(parents=True, exist_ok=True)
        sources = []
        for path in self.sources():
            if path.suffix == ".cu":
                out = gen / f"{path.stem}_cu.cpp"
                text = translate(path.read_text(), str(path.relative_to(root)))
                if not out.exists() or out.read_text() != text:
                    tmp = out.with_suffix(".tmp")
                    tmp.write_text(text)
                    tmp.replace(out)
                path = out
            sources.append(str(path))
        return sources


_BUILDER = CudaEmuBuilder()


def load():
    """``torch.ops.fastlm_cuda_emu``, building it on first use (~1 min)."""
    return _BUILDER.load()
