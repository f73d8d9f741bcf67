"""One benchmark harness for every op: timing, ceilings, rows, results files and plots.

Timing: ``warmup`` untimed calls, then ``repeat`` timed calls; on CUDA with CUDA events, on
the CPU with perf_counter. Inputs rotate through ``rotate`` copies so a kernel does not keep
re-reading the same warm cache lines (on the CPU a 2 MiB L2 would otherwise flatter small
sizes). Every row carries the median and the 20th/80th percentiles.

Ceilings are measured in the same run (``matmul_peak_tflops``, ``copy_bandwidth_gbs``), so a
ratio like "% of peak" never mixes numbers from different machines or moments.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


def comma_list(kind=None, choices=None):
    """An argparse ``type`` for a comma list: checks each item (positive ``kind`` numbers, or
    one of ``choices``) so a typo is a usage error naming the option, not a traceback; returns
    the text unchanged for the command to split."""
    import argparse

    def check(text: str) -> str:
        items = [x.strip() for x in text.split(",")]
        for x in items:
            if choices is not None and x not in choices:
                raise argparse.ArgumentTypeError(
                    f"{x!r} is not one of {', '.join(choices)} (give a comma list of them)")
            if kind is not None:
                try:
                    ok = kind(x) > 0
                except ValueError:
                    ok = False
                if not ok:
                    raise argparse.ArgumentTypeError(
                        f"{x!r} is not a positive {kind.__name__} (give a comma list, e.g. 256,512)")
        return ",".join(items)

    return check


def chosen_impls(spec: str, available: Sequence[str], device: str) -> set[str] | None:
    """``--impls``: None (all) when empty, else the names it lists, each one of ``available``
    (what runs on ``device``); a name that is not (a typo, or a GPU kernel asked for on the
    CPU) is a usage error listing them: it was dropped, and the report came out empty."""
    if not spec:
        return None
    wanted = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in wanted if x not in available]
    if bad or not wanted:
        from fastlm.cli import UserError

        raise UserError(f"--impls {spec!r}: {', '.join(bad) or 'nothing'} is not an "
                        f"implementation on {device}; choose from {', '.join(available)}")
    return set(wanted)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    times_ms: tuple = ()  # every timed call in order (time_interleaved: one per round)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[int], object],
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 10,
    min_time_s: float = 0.0,
) -> Timing:
    """Time ``fn(i)`` where ``i`` indexes the rotating input copy to use.

    Runs at least ``repeat`` timed calls and keeps going until ``min_time_s`` has passed.
    """
    for i in range(warmup):
        fn(i)
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    i = 0
    while len(times) < repeat or time.perf_counter() - start_all < min_time_s:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], len(times))


def time_interleaved(
    fns: dict[str, Callable[[int], object]],
    *,
    device: str = "cpu",
    warmup: int = 1,
    repeat: int = 5,
    cpu_memory: bool = False,
) -> tuple[dict[str, Timing], dict[str, float | None]]:
    """Time several implementations of one step in alternation: round r runs each once, in an
    order rotated by r. On a shared or throttling machine, speed drifts over seconds; timing
    A's calls then B's lets the drift land on one of them, alternating spreads it over all.
    Returns (Timing per name, peak GPU memory in GiB per name; None on the CPU). The peak is
    what a call needed above what was allocated when it began (activations, gradients created
    in it, temporaries), so the other implementations' resident weights never count.
    ``cpu_memory`` on the CPU: the same from the process's peak resident memory, measured in
    one more, untimed call per implementation (:func:`cpu_peak_gb`; None where unsupported)."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](i)
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float | None] = {n: None for n in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fns[name](r)
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            if device.startswith("cuda"):
                gb = (torch.cuda.max_memory_allocated() - base) / 2**30
                peaks[name] = max(peaks[name] or 0.0, gb)
    if cpu_memory and not device.startswith("cuda"):
        for name in names:
            peaks[name] = cpu_peak_gb(functools.partial(fns[name], repeat))
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = Timing(statistics.median(ts), q[0], q[3], len(ts), tuple(ts))
    return out, peaks


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def cpu_peak_gb(call: Callable[[], object]) -> float | None:
    """GiB the process's resident memory rose to above where it stood before ``call``: Linux's
    peak (VmHWM) reset through /proc/self/clear_refs, after glibc gave its cached free memory
    back (malloc_trim), so memory the call frees and allocates again counts once and memory an
    earlier call left cached does not hide its need. None where Linux's interface is missing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status("VmRSS")
    except OSError:
        return None
    call()
    return max(0, _proc_status("VmHWM") - base) / 2**30


def paired_speedup(timings: dict, ours: str, peers: Sequence[str]) -> float | None:
    """Median over rounds of (fastest peer's time in the round / ours in the round).

    With :func:`time_interleaved` the calls of one round run back to back, so each round's
    ratio sees the same machine state; its median is steadier than a ratio of medians when
    the machine drifts by more than the difference being measured."""
    rounds = [t for t in (timings.get(p) for p in peers) if t is not None and t.times_ms]
    mine = timings.get(ours)
    if not rounds or mine is None or not mine.times_ms:
        return None
    ratios = [min(r.times_ms[i] for r in rounds) / m for i, m in enumerate(mine.times_ms)
              if all(i < len(r.times_ms) for r in rounds)]
    return statistics.median(ratios) if ratios else None


def matmul_peak_tflops(device: str, dtype: torch.dtype, n: int | None = None) -> float:
    """Achieved TFLOP/s of a square matmul: the practical ceiling for attention FLOPs."""
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda i: torch.mm(a, b), device=device, warmup=2, repeat=5)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def copy_bandwidth_gbs(device: str, nbytes: int | None = None) -> float:
    """Achieved GB/s of a large tensor copy (read + write): the ceiling for memory-bound ops."""
    nbytes = nbytes or (2 << 30 if device.startswith("cuda") else 256 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), device=device, warmup=2, repeat=7)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def update_bandwidth_gbs(device: str, nbytes: int | None = None) -> float:
    """Achieved GB/s of a large in-place update ``a += b`` (read a and b, write a).

    The ceiling for in-place optimizers: unlike a copy, whose destination lines a CPU must
    first read (read-for-ownership: 3 transfers counted as 2), every byte written here was
    just read, so the counted bytes are the bytes moved, as in an AdamW step.
    """
    nbytes = nbytes or (2 << 30 if device.startswith("cuda") else 256 << 20)
    a = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    b = torch.ones_like(a)
    t = time_fn(lambda i: a.add_(b), device=device, warmup=2, repeat=7)
    return 3 * nbytes / (t.median_ms * 1e-3) / 1e9


def environment(device: str) -> dict:
    """Device and versions to tag every result with."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    for mod in ("triton", "deepspeed", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["cpu_simd"] = cpu_simd_level()
    info["device"] = info.get("gpu") or (
        f"CPU ({info['cpu']}, {os.cpu_count()} cores, {info['cpu_simd']})")
    return info


def cpu_simd_level() -> str:
    """The widest vector instructions fastlm's CPU kernels use here: results from machines
    with and without AVX-512 BF16 differ by ~4x in bf16, so every result names it."""
    from fastlm._build import cpu_features

    flags = cpu_features()
    for level, needed in (("avx512_bf16", ("avx512f", "avx512_bf16")), ("avx512", ("avx512f",)),
                          ("avx2", ("avx2", "fma"))):
        if all(f in flags for f in needed):
            return level
    return "scalar"


@dataclass
class Report:
    """Rows of one benchmark run plus what they were measured with."""

    name: str
    command: str
    device: str
    env: dict = field(default_factory=dict)
    ceilings: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # run-level results that are not rows

    def add(self, **row) -> None:
        self.rows.append(row)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def write(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        """Write ``<stem>.json``, ``<stem>.md`` (table + command) atomically; returns paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or self.name
        paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
        _atomic_write(paths[0], self.to_json())
        _atomic_write(paths[1], self.markdown())
        return paths

    def markdown(self) -> str:
        lines = [
            f"# {self.name}",
            "",
            f"Command: `{self.command}`",
            "",
            f"Device: {self.env.get('device', self.device)}; torch {self.env.get('torch')}, "
            f"triton {self.env.get('triton')}; {self.env.get('date')}",
            "",
        ]
        if self.ceilings:
            lines.append("Ceilings measured in the same run: " + ", ".join(
                f"{k} = {v:.4g}" for k, v in self.ceilings.items()) + "")
            lines.append("")
        if self.summary:
            lines.append("Summary: " + ", ".join(
                f"{k} = {_fmt(v)}" for k, v in self.summary.items()))
            lines.append("")
        lines += format_table(self.rows, markdown=True).splitlines()
        return "\n".join(lines) + "\n"


def add_speedup(report: Report, column: str, group_by: Sequence[str], is_peer) -> None:
    """Add ``column`` = (fastest peer's ms in the row's group) / (row's ms) to every row.

    A group is the rows sharing the ``group_by`` fields (e.g. dtype, mode, seqlen); peers are
    the rows for which ``is_peer(row)`` is true. Rows without a time get None.
    """
    best: dict = {}
    for r in report.rows:
        if is_peer(r) and r.get("ms"):
            key = tuple(r[k] for k in group_by)
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in report.rows:
        b = best.get(tuple(r[k] for k in group_by))
        r[column] = b / r["ms"] if b and r.get("ms") else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if markdown:
        head = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = ["| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |" for row in cells]
        return "\n".join([head, sep, *body])
    head = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    body = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join([head, "-" * len(head), *body])


def plot(
    report: Report,
    path: str | Path,
    *,
    x: str,
    y: str,
    series: str,
    facet: str | None = None,
    ylabel: str | None = None,
    logx: bool = True,
) -> Path:
    """Line plot of ``y`` against ``x``, one line per ``series`` value, one panel per ``facet``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facets = sorted({str(r.get(facet)) for r in report.rows}) if facet else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(5.5 * len(facets), 4), squeeze=False)
    for ax, fval in zip(axes[0], facets):
        rows = [r for r in report.rows if facet is None or str(r.get(facet)) == fval]
        for name in sorted({str(r[series]) for r in rows}):
            pts = sorted((r[x], r[y]) for r in rows if str(r[series]) == name and r.get(y) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or y)
        ax.set_title(f"{facet} = {fval}" if facet else report.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.name} on {report.env.get('device', report.device)}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
