#!/usr/bin/env python
"""Compile every Triton kernel fastlm launches for NVIDIA GPUs, on a machine without one.

The CPU tests run the Triton kernels in Triton's interpreter, which executes their Python and
never lowers them: nothing there shows a kernel that fails to compile for a GPU (a dtype path
the interpreter let through, a ``tl.dot`` shape the hardware does not take), a configuration
that needs more shared memory than the GPU has, or one whose registers spill. This script runs
fastlm's own launchers (``fastlm.triton_kernels``) with CPU tensors against a stand-in Triton
driver for one architecture: every kernel they launch, each autotuning configuration included,
goes through Triton's compiler and ptxas to a cubin; the stand-in "loads" it, checking the
shared memory against the architecture's limit where Triton checks it on a device, and
launches nothing (no result is computed: correctness is the interpreter's and the GPU tests'
job). Per kernel and configuration it reports shared memory, registers, spill stack and the
tensor-core instructions in the machine code (cuobjdump: on sm_90, whether the dots became
Hopper's warpgroup MMA), and what failed.

    python benchmarks/triton_compile.py --arch 80,90 --cases full --out benchmarks/results

exits 1 when a case cannot run on an architecture (no configuration of a kernel fits, or a
compile error), 0 otherwise. Configurations the autotuner drops for shared memory are listed,
not failures: Triton's autotuner skips them on the device too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the most shared memory one block may use (the opt-in maximum, bytes): A100, RTX 30xx,
# L4/RTX 40xx, H100/H200
SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# constexpr arguments worth naming in the report (the rest are shapes and flags of the case)
_SHOWN = ("BLOCK_M", "BLOCK_N", "BLOCK", "BLOCK_S", "BLOCK_H")


def _install_driver(arch: int, events: list) -> None:
    """Triton's active driver replaced by one for ``arch`` that loads and launches nothing."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import OutOfResources
    from triton.runtime.driver import driver

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": SHARED_MEMORY[arch], "multiprocessor_count": 132,
                    "max_num_regs": 65536, "warpSize": 32}

        def load_binary(self, name, kernel, shared, device):
            return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

        def unload_module(self, module):
            pass

    class Driver:
        utils = Utils()

        @staticmethod
        def launcher_cls(src, metadata):
            return lambda *args, **kwargs: None

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

        def get_benchmarker(self):
            # the autotuner times each configuration through this: run it once (compile and
            # "load"), note one dropped for shared memory, and call every one equally fast
            def bench(call, quantiles=None, **kwargs):
                try:
                    call()
                except OutOfResources as exc:
                    events.append({"dropped": str(exc)})
                    raise
                return [1.0, 1.0, 1.0] if quantiles else 1.0
            return bench

    driver.set_active(Driver())


def _record_compiles(records: list) -> None:
    import triton.compiler as tc

    real = tc.compile
    cuobjdump = Path(__import__("triton").__file__).parent / "backends/nvidia/bin/cuobjdump"

    def compile(src, target=None, options=None, **kwargs):
        t0 = time.perf_counter()
        kernel = real(src, target=target, options=options, **kwargs)
        names = src.fn.arg_names
        consts = {names[path[0]]: value for path, value in src.constants.items()
                  if len(path) == 1 and names[path[0]] in _SHOWN}
        usage = _resource_usage(cuobjdump, kernel.asm["cubin"])
        records.append({"kernel": src.fn.__name__, "config": consts,
                        "num_warps": kernel.metadata.num_warps,
                        "num_stages": kernel.metadata.num_stages,
                        "shared": kernel.metadata.shared, **usage,
                        "seconds": round(time.perf_counter() - t0, 2)})
        return kernel

    tc.compile = compile


# SASS opcodes of the tensor-core instructions: Hopper's warpgroup MMA (wgmma), and the warp
# MMA every architecture since Volta has (mma.sync; on sm_90 a dot too small for a warpgroup)
_TENSOR_CORE_SASS = {"wgmma": re.compile(r"\bHGMMA\."), "mma_sync": re.compile(r"\bHMMA\.")}


def _resource_usage(cuobjdump: Path, cubin: bytes) -> dict:
    """Registers, spill stack (bytes a thread) and tensor-core instruction counts of a cubin,
    from cuobjdump."""
    usage = {"registers": None, "spill_stack": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([str(cuobjdump), "--dump-sass", f.name],
                              capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(x.split(":", 1) for x in line.split() if ":" in x)
            usage = {"registers": int(fields["REG"]), "spill_stack": int(fields["STACK"])}
            break
    return {**usage, **{name: len(op.findall(sass)) for name, op in _TENSOR_CORE_SASS.items()}}


def _cases(kind: str) -> dict:
    """name -> a callable running the launchers of one case."""
    import torch
    from fastlm.triton_kernels import activations, adamw, cross_entropy, norms, rotary
    from fastlm.triton_kernels import attention as A

    def attention(dtype, d, varlen=False, mask=False, softcap=0.0, group=1, window=(-1, -1)):
        def run():
            g = torch.Generator().manual_seed(0)
            hq, scale = 4, d ** -0.5
            lens = [37, 63]
            if varlen:
                cu = torch.tensor([0, 37, 100], dtype=torch.int32)
                q, k, v = (torch.randn(100, h, d, dtype=dtype, generator=g)
                           for h in (hq, hq // group, hq // group))
                out, lse = A.attention_varlen_fwd(q, k, v, cu, cu, max(lens), max(lens), True,
                                                  scale, *window, softcap)
                A.attention_varlen_bwd(torch.randn_like(out), q, k, v, out, lse, cu, cu,
                                       max(lens), max(lens), True, scale, *window, softcap,
                                       False)
                return
            q, k, v = (torch.randn(2, h, 100, d, dtype=dtype, generator=g)
                       for h in (hq, hq // group, hq // group))
            keep = torch.arange(100)[None] < torch.tensor(lens)[:, None] if mask else None
            out, lse = A.attention_fwd(q, k, v, keep, not mask, scale, *window, softcap)
            A.attention_bwd(torch.randn_like(out), q, k, v, out, lse, keep, not mask, scale,
                            *window, softcap, False)
        return run

    def norms_case(dtype, h, affine=True):
        def run():
            x = torch.randn(8, h, dtype=dtype)
            w, b = torch.randn(h, dtype=dtype), torch.randn(h, dtype=dtype)
            if not affine:  # the kernels' HAS_W/HAS_B/WANT_* branches off
                w = b = None
            y, rstd = norms.rms_norm_fwd(x, w, 1e-6, 1.0 if affine else 0.0)
            norms.rms_norm_bwd(torch.randn_like(y), x, w, rstd, 1.0 if affine else 0.0, affine)
            y, mean, rstd = norms.layer_norm_fwd(x, w, b, 1e-5)
            norms.layer_norm_bwd(torch.randn_like(y), x, w, mean, rstd, affine, affine)
        return run

    def rotary_case(dtype, d, interleaved=False, rot=None, batch_tables=False):
        def run():
            x = torch.randn(2, 4, 33, d, dtype=dtype)
            shape = (2 if batch_tables else 1, 33, rot or d)  # rot < d: partial rotary
            cos, sin = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
            for inverse in (False, True):
                rotary.rotary(x, cos, sin, inverse, interleaved)
        return run

    def activations_case(dtype):
        def run():
            x, u = torch.randn(1000, dtype=dtype), torch.randn(1000, dtype=dtype)
            for act in (0, 1, 2):  # silu, gelu, gelu_tanh (fastlm.ops.activations.ACT_CODES)
                activations.act_bwd(activations.act_fwd(x, act), x, act)
                activations.glu_bwd(activations.glu_fwd(x, u, act), x, u, act)
        return run

    def cross_entropy_case(dtype, vocab, **opts):
        def run():
            for grad in (False, True):
                cross_entropy.ce_rows(torch.randn(8, vocab, dtype=dtype),
                                      torch.randint(0, vocab, (8,)), torch.ones(8), -100,
                                      opts.get("smoothing", 0.0), opts.get("softcap", 0.0), grad)
        return run

    def adamw_case(dtype, state_dtype=torch.float32):
        def run():
            ps = [torch.randn(n, dtype=dtype) for n in (1000, 4099)]
            state = [[torch.zeros(p.numel(), dtype=state_dtype) for p in ps] for _ in range(2)]
            masters = [p.float() for p in ps] if dtype != torch.float32 else []
            adamw.adamw_step_(ps, [torch.randn_like(p) for p in ps], *state, masters, 1e-3, 0.9,
                              0.999, 1e-8, 0.1, 1, 1.0)
        return run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cases = {
        "attention bf16 d128": attention(bf16, 128),
        "attention fp16 d64 varlen gqa4": attention(fp16, 64, varlen=True, group=4),
        "attention fp32 d80 mask softcap window": attention(fp32, 80, mask=True, softcap=30.0,
                                                           window=(16, 0)),
        "norms bf16 h4096": norms_case(bf16, 4096),
        "norms fp32 h1000": norms_case(fp32, 1000),
        "norms bf16 h1000 no weight": norms_case(bf16, 1000, affine=False),
        "rotary bf16 d128": rotary_case(bf16, 128),
        "rotary bf16 d80 partial per-batch tables": rotary_case(bf16, 80, rot=32,
                                                                 batch_tables=True),
        "activations bf16": activations_case(bf16),
        "adamw fp32": adamw_case(fp32),
        "adamw bf16 masters": adamw_case(bf16),
        "adamw fp32 bf16 moments": adamw_case(fp32, state_dtype=bf16),
        "cross-entropy rows bf16 50257": cross_entropy_case(bf16, 50257),
        "cross-entropy rows fp32 smoothing softcap": cross_entropy_case(fp32, 1000,
                                                                        smoothing=0.1,
                                                                        softcap=30.0),
    }
    if kind == "full":
        for dt, name in ((bf16, "bf16"), (fp16, "fp16"), (fp32, "fp32")):
            for d in (64, 128):
                cases[f"attention {name} d{d}"] = attention(dt, d)
                cases[f"attention {name} d{d} varlen"] = attention(dt, d, varlen=True)
        cases["attention bf16 d256"] = attention(bf16, 256)
        cases["attention bf16 d128 gqa4"] = attention(bf16, 128, group=4)
        cases["attention bf16 d96 mask softcap"] = attention(bf16, 96, mask=True, softcap=50.0)
        cases["norms fp16 h8192"] = norms_case(fp16, 8192)
        cases["rotary fp32 d64 interleaved"] = rotary_case(fp32, 64, interleaved=True)
        cases["activations fp32"] = activations_case(fp32)
        cases["adamw fp16 masters"] = adamw_case(fp16)
    return cases


def _one_arch(arch: int, kind: str) -> dict:
    """Run every case for ``arch`` in this process (a fresh one: Triton's caches of compiled
    kernels and autotuning choices are per process and not per architecture)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    records, events = [], []
    _install_driver(arch, events)
    _record_compiles(records)
    results = []
    for name, run in _cases(kind).items():
        first, dropped = len(records), len(events)
        t0 = time.perf_counter()
        try:
            run()
            error = None
        except Exception as exc:  # a failed case is reported, the others still run
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        results.append({"case": name, "ok": error is None, "error": error,
                        "seconds": round(time.perf_counter() - t0, 1),
                        "compiled": records[first:],
                        "dropped_for_shared_memory": len(events) - dropped})
    return {"arch": arch, "shared_memory_limit": SHARED_MEMORY[arch], "cases": results}


def _markdown(reports: list, command: str) -> str:
    lines = ["# Triton kernels compiled for NVIDIA GPUs without one\n", f"`{command}`\n",
             "Every kernel fastlm's Triton launchers start, each autotuning configuration, "
             "compiled by Triton and ptxas to a cubin per architecture; shared memory checked "
             "against the architecture's limit as Triton checks it on a device (configurations "
             "over it are skipped by the autotuner there too); registers, spill stack (bytes "
             "a thread) and the tensor-core instructions in the machine code (SASS: Hopper's "
             "warpgroup MMA `HGMMA`, the warp MMA `HMMA`; how many configurations hold any) "
             "from cuobjdump. No kernel ran. Each configuration: the JSON beside this "
             "file.\n"]
    for rep in reports:
        limit = rep["shared_memory_limit"]
        lines += [f"\n## sm_{rep['arch']} (shared memory limit {limit} bytes)\n",
                  "| case | compiles | kernel | configurations | over the shared memory limit "
                  "| spilling (most bytes) | registers (most) | with wgmma / mma.sync | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for case in rep["cases"]:
            by_kernel: dict = {}
            for c in case["compiled"]:
                by_kernel.setdefault(c["kernel"], []).append(c)
            ok = "yes" if case["ok"] else case["error"]
            if not by_kernel:
                lines.append(f"| {case['case']} | {ok} | | | | | | | |")
            for i, (kernel, cs) in enumerate(by_kernel.items()):
                spills = [c["spill_stack"] or 0 for c in cs]
                spilling = sum(1 for x in spills if x)
                lines.append(
                    f"| {case['case'] if i == 0 else ''} | {ok if i == 0 else ''} | {kernel} "
                    f"| {len(cs)} | {sum(1 for c in cs if c['shared'] > limit)} "
                    f"| {spilling} ({max(spills)}) | {max(c['registers'] or 0 for c in cs)} "
                    f"| {sum(1 for c in cs if c['wgmma'])} / {sum(1 for c in cs if c['mma_sync'])} "
                    f"| {sum(c['seconds'] for c in cs):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90",
                        help=f"comma list of compute capabilities ({sorted(SHARED_MEMORY)})")
    parser.add_argument("--cases", choices=("ci", "full"), default="ci")
    parser.add_argument("--out", default=None, help="directory for triton_compile.{json,md}")
    parser.add_argument("--name", default="triton_compile")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child
    args = parser.parse_args(argv)
    if args.one is not None:
        json.dump(_one_arch(args.one, args.cases), sys.stdout)
        return 0
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in SHARED_MEMORY]
    if unknown or not archs:
        parser.error(f"--arch {args.arch!r}: choose from {sorted(SHARED_MEMORY)}")
    # one process per architecture, side by side
    children = [subprocess.Popen([sys.executable, __file__, "--one", str(a), "--cases",
                                  args.cases], stdout=subprocess.PIPE, text=True)
                for a in archs]
    reports = []
    for arch, child in zip(archs, children):
        out, _ = child.communicate()
        if child.returncode != 0:
            print(f"sm_{arch}: the compile run failed (exit {child.returncode})", file=sys.stderr)
            return 1
        reports.append(json.loads(out))
    failed = [(r["arch"], c["case"], c["error"]) for r in reports for c in r["cases"]
              if not c["ok"]]
    for r in reports:
        n = sum(len(c["compiled"]) for c in r["cases"])
        spills = sum(1 for c in r["cases"] for k in c["compiled"] if k["spill_stack"])
        big = sum(c["dropped_for_shared_memory"] for c in r["cases"])
        print(f"sm_{r['arch']}: {len(r['cases'])} cases, {n} kernels compiled, {big} "
              f"configurations over the shared memory limit, {spills} spilling registers")
    for arch, case, error in failed:
        print(f"FAILED sm_{arch} {case}: {error}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/triton_compile.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]))
        import triton

        (out / f"{args.name}.json").write_text(json.dumps(
            {"command": command, "triton": triton.__version__, "reports": reports}, indent=1))
        (out / f"{args.name}.md").write_text(_markdown(reports, command))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
