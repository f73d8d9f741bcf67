"""Corpora that exist on every machine, so the README's default run needs no download.

``builtin:pydoc`` is Python's own help text (``pydoc_data.topics``): ~0.8 MB of real English
technical prose shipped with every CPython.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


def materialize(spec: str, directory: str | Path) -> Path:
    """A JSONL file of documents for ``builtin:<name>`` (written once, atomically)."""
    name = spec[len(BUILTIN_PREFIX):]
    if name != "pydoc":
        raise ValueError(f"unknown built-in corpus {spec!r}; available: builtin:pydoc")
    from pydoc_data.topics import topics

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pydoc_topics.jsonl"
    if not path.is_file():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            for key in sorted(topics):
                f.write(json.dumps({"id": key, "text": topics[key]}) + "\n")
        os.replace(tmp, path)
    return path


def resolve_inputs(inputs: list[str], directory: str | Path) -> list[str]:
    """Replace ``builtin:`` entries by the files they materialize to."""
    return [str(materialize(i, directory)) if i.startswith(BUILTIN_PREFIX) else i
            for i in inputs]
