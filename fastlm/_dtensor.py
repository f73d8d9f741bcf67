"""DTensor checks that import nothing.

FSDP2 and tensor parallelism hand fastlm DTensors (sharded parameters, gradients, optimizer
state). A DTensor can only exist once ``torch.distributed.tensor`` has been imported, and
importing it costs ~0.8 s, so these read it from ``sys.modules`` instead of importing it: a
process that never shards pays nothing (``import fastlm.optim`` paid the 0.8 s).
"""

from __future__ import annotations

import sys

import torch


def is_dtensor(x) -> bool:
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(x, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage: written in place), else ``t``."""
    return t.to_local() if is_dtensor(t) else t
