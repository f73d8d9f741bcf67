"""fastlm._malloc: freed memory stays in the process, so a training step's allocations stop
costing page faults. Measured in child processes (the settings are process-wide)."""

import subprocess
import sys

import pytest

# Rounds of 20 x 2 MiB buffers, written and freed: with glibc's defaults the freed 40 MiB at
# the top of the heap exceeds its trim threshold and goes back to the kernel every round, so
# each round faults its pages in again; kept, later rounds fault nothing.
_SCRIPT = """
import ctypes, resource, sys
tune = sys.argv[1] == "1"
if tune:
    from fastlm import _malloc
    assert _malloc.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def round_():
    bufs = [libc.malloc(2 << 20) for _ in range(20)]
    for b in bufs:
        ctypes.memset(b, 1, 2 << 20)
    for b in bufs:
        libc.free(b)
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tune: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, "1" if tune else "0"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    default, kept = _faults(False), _faults(True)
    assert default > 8 * 5000  # 8 rounds of 40 MiB (10240 pages): the defaults refault them
    assert kept < 500, (default, kept)


def test_only_the_train_command_keeps_freed_memory(monkeypatch):
    import fastlm.train.cli
    import fastlm.train.export
    from fastlm import _malloc, cli

    calls = []
    monkeypatch.setattr(_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(fastlm.train.cli, "run", lambda args: 0)
    monkeypatch.setattr(fastlm.train.export, "run", lambda args: 0)
    assert cli.main(["export", "ckpt", "out"]) == 0 and calls == []
    assert cli.main(["train"]) == 0 and calls == [1]
