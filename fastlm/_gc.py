"""Python's garbage collector around a command's start and the trainer's loop.

Starting ``fastlm train`` imports torch, transformers and deepspeed and builds a model: ~1M
Python objects, none of them garbage, and the collector's full passes over them (seven, 13 to
170 ms each, measured with ``gc.callbacks``) cost ~0.6 s of the Shakespeare recipe's ~4 s
start. So the CLI pauses the collector while it starts (:func:`pause`), and the trainer resumes
it just before its loop with everything alive at that point moved to the permanent generation
(:func:`loop`), so the loop's collections scan only what the loop creates. After the loop the
objects are unfrozen, so a process that trains several times (the tests) still collects them.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_paused = False


def pause() -> None:
    """Stop automatic collection until :func:`resume` (a no-op if it is already off)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Undo :func:`pause`; collection that was off before it stays off."""
    global _paused
    if _paused:
        _paused = False
        gc.enable()


@contextmanager
def loop() -> Iterator[None]:
    """The training loop: collection resumed, what exists now frozen, unfrozen after. A process
    that froze objects itself keeps its own freeze, untouched."""
    resume()
    mine = gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()
