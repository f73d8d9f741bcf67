"""File modes for what fastlm writes through a temporary name.

``tempfile.mkdtemp``/``mkstemp`` create owner-only entries (0700/0600) whatever the umask, and
transformers writes ``model.safetensors`` 0600 too; renamed into place, a prepared dataset or an
exported model was unreadable to the rest of a team sharing a data directory. :func:`shareable`
gives them the modes a plain ``mkdir``/``open`` would have given under the process's umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (read from /proc where it is, without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the above)
    os.umask(mask)
    return mask


def shareable(path: str | Path) -> None:
    """``path`` (a file, or a directory and everything under it) given the modes a plain
    mkdir (0777) or file creation (0666, 0777 where any execute bit is set) has under the
    umask; links are left alone."""
    mask = umask()
    path = Path(path)
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        entries += list(path.rglob("*"))
    for p in entries:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        else:
            p.chmod((0o777 if p.stat().st_mode & 0o111 else 0o666) & ~mask)
