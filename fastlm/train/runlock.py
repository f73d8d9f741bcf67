"""One run at a time writes to a run directory.

Two runs given the same ``out_dir`` (a job submitted twice, a requeued job started while the
old one still runs, a typo in a sweep) interleave their checkpoints, metrics and ``latest``,
and ``--resume auto`` then continues from the other run's state: nothing fails, the results
are silently mixed. Rank 0 holds an advisory ``flock`` on ``out_dir/.fastlm.lock`` for the
whole run (the kernel lets go when the process ends, ``kill -9`` included, so a crashed run
never leaves a stale lock); a second run finds it held and stops before it reads or writes
anything, naming the holder. Filesystems without locks (some NFS and Lustre mounts) get a
one-time warning and run unguarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path

from fastlm.train import dist as fdist
from fastlm.train.config import ConfigError

LOCK_NAME = ".fastlm.lock"
_logger = logging.getLogger(__name__)


def _try_lock(out_dir: Path):
    """(open lock file or None, why the run cannot have ``out_dir``: None when it can)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as exc:
        return None, (f"out_dir {str(out_dir)!r} cannot be written ({exc.strerror or exc}): "
                      f"choose a directory this user can write, or fix its permissions")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        return None, (f"out_dir {str(out_dir)!r} is in use by another fastlm run by {holder}: "
                      f"wait for it to end or stop it, or choose another out_dir")
    except OSError as exc:  # no locks on this filesystem: run, but say so
        f.close()
        _logger.warning("fastlm: cannot lock %s (%s); nothing stops a second run from writing "
                        "to the same out_dir", out_dir / LOCK_NAME, exc)
        return None, None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
    f.flush()
    return f, None


@contextlib.contextmanager
def hold(out_dir: Path, rank: int, dev):
    """Hold ``out_dir`` for the run (collective: every rank raises when it is in use or cannot
    be written)."""
    f, problem = _try_lock(out_dir) if rank == 0 else (None, None)
    if fdist.any_true(problem is not None, dev):
        raise ConfigError(problem or f"out_dir {str(out_dir)!r}: rank 0 cannot hold it (see "
                                     f"rank 0's error)")
    try:
        yield
    finally:
        if f is not None:
            f.close()  # closing the file lets go of the lock
