"""What fastlm renames into place gets the modes a plain mkdir/open would have given."""

import os
import stat
import tempfile
from pathlib import Path

import pytest

from fastlm._fs import shareable, umask


@pytest.fixture
def mask():
    before = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(before)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask and umask() == mask


def test_temporary_entries_get_the_modes_of_plain_ones(tmp_path, mask):
    """mkdtemp's 0700 and mkstemp's 0600 (as a prepared dataset, an export and transformers'
    weights were left): directories 0777 and files 0666 under the umask, an executable file
    keeps execute bits, a link is not followed."""
    top = Path(tempfile.mkdtemp(dir=tmp_path))
    (top / "sub").mkdir(mode=0o700)
    fd, name = tempfile.mkstemp(dir=top / "sub")
    os.close(fd)
    tool = top / "tool.sh"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o700)
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o600)
    (top / "link").symlink_to(outside)
    assert mode(top) == 0o700 and mode(Path(name)) == 0o600
    shareable(top)
    assert mode(top) == mode(top / "sub") == 0o750
    assert mode(Path(name)) == 0o640 and mode(tool) == 0o750
    assert mode(outside) == 0o600  # through the link: untouched
