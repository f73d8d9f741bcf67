"""Fixed-length blocks over prepared shards: deterministic, rank-disjoint, exactly resumable.

The split's shards are concatenated virtually and one global stream of samples is defined by
the seed alone: sample ``c`` is a block starting at a random offset (``random`` mode,
nanoGPT's sampling) or the ``c``-th block of a fresh per-epoch permutation of non-overlapping
blocks (``sequential`` mode, every token once per epoch). Micro-batch ``k`` of a run with
``world_size`` ranks is samples ``[k*G, (k+1)*G)``, ``G = batch_size * world_size``, and rank
``r`` takes its own contiguous ``batch_size`` of them. So:

- ranks never read the same sample, and in sequential mode never the same block in an epoch;
- the data of a step does not depend on how it is split into ranks and micro-batches: 2 ranks
  x micro 4, 1 rank x micro 8 and 1 rank x micro 2 x 4 accumulation steps see the same tokens,
  which is what makes their loss curves comparable;
- the loader's whole state is the micro-batch counter: a resumed run sees exactly the batches
  an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastlm.data.format import FormatError, Split, open_split

IGNORE_INDEX = -100  # targets the loss skips (prompt tokens in SFT data), as torch's CE default


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where no loss
    position_ids: torch.Tensor | None = None  # (B, T), restarting at each document
    cu_seqlens: torch.Tensor | None = None  # (docs+1,) int32 over the flattened batch
    max_seqlen: int = 0
    # preference pairs with DPO's reference precomputed: each row's summed log-probability
    # under the starting model (fastlm.train.dpo.reference_logps)
    ref_logps: torch.Tensor | None = None

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids),
                     move(self.cu_seqlens), self.max_seqlen, move(self.ref_logps))


class _SampleStream:
    """What every loader shares: the global stream of samples cut into this rank's
    micro-batches, the micro-batch counter as the whole state, batches built from
    ``_row(c)`` = (the loader holding sample ``c``, its start)."""

    _KEEP = ("seed", "mode", "block_size")  # a resume with another value is refused

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "mode": self.mode,
                "batch_size": self.batch_size, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped. Another number of ranks or micro-batch size
        continues at the same sample (the stream does not depend on them), provided the
        samples read so far fill whole micro-batches of this run."""
        if ("mix" in state) != hasattr(self, "mix"):
            raise ValueError(f"loader state was saved {'with' if 'mix' in state else 'without'} "
                             f"data.mix, this run has {'it' if hasattr(self, 'mix') else 'none'}: "
                             f"resume with the same data settings")
        for key in self._KEEP:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r}, this run has "
                    f"{getattr(self, key)!r}: resume with the same data settings")
        samples = int(state["step"]) * state.get("world_size", self.world_size) * \
            state.get("batch_size", self.batch_size)
        per_step = self.world_size * self.batch_size
        if samples % per_step:
            raise ValueError(
                f"loader state: {samples} samples were read ({state.get('world_size')} ranks x "
                f"micro-batch {state.get('batch_size')}), not a whole number of this run's "
                f"micro-batches ({self.world_size} ranks x {self.batch_size}): resume with a "
                f"micro-batch size that divides the saved run's global batch")
        self.step = samples // per_step

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int) -> Batch:
        return build_batch(self._rows(step), self.block_size, self.boundaries)

    def _rows(self, step: int) -> list[tuple[BlockLoader, int]]:
        b = self.batch_size
        first = (step * self.world_size + self.rank) * b  # this rank's samples of micro-batch
        return [self._row(c) for c in range(first, first + b)]

    def _row(self, c: int) -> tuple[BlockLoader, int]:
        raise NotImplementedError


class BlockLoader(_SampleStream):
    """Batches of ``batch_size`` blocks of ``block_size`` tokens (+1 for the shifted targets)."""

    def __init__(self, split: Split | str | Path, block_size: int, batch_size: int, *,
                 split_name: str = "train", rank: int = 0, world_size: int = 1, seed: int = 0,
                 mode: str = "random", boundaries: bool = False):
        if not isinstance(split, Split):
            split = open_split(split, split_name)
        if mode not in ("random", "sequential"):
            raise ValueError(f"loader mode must be 'random' or 'sequential', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got {block_size}, "
                             f"{batch_size}")
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self.boundaries = boundaries
        self.step = 0
        lens = [len(s.tokens) for s in split.shards]
        self._offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        total = int(self._offsets[-1])
        self._total = total
        if total < block_size + 1:
            raise FormatError(
                f"split {split.name!r} has {total} tokens, fewer than block_size+1 = "
                f"{block_size + 1}; use a smaller block_size or more data")
        self._nblocks = (total - 1) // block_size
        self._doc_starts = np.unique(np.concatenate(
            [s.doc_starts[:-1] + o for s, o in zip(split.shards, self._offsets[:-1])]))
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._chunk_cache: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_epoch(self) -> int:
        return self._nblocks * self.block_size

    # -- samples ------------------------------------------------------------------------------
    def _row(self, c: int) -> tuple[BlockLoader, int]:
        return self, self._sample_start(c)

    _CHUNK = 4096  # random starts are drawn per chunk of samples, from (seed, chunk) alone

    def _sample_start(self, c: int) -> int:
        if self.mode == "random":
            k, j = divmod(c, self._CHUNK)
            if self._chunk_cache is None or self._chunk_cache[0] != k:
                rng = np.random.default_rng([self.seed, k])
                starts = rng.integers(0, self._total - self.block_size, size=self._CHUNK)
                self._chunk_cache = (k, starts)
            return int(self._chunk_cache[1][j])
        epoch, j = divmod(c, self._nblocks)
        return int(self._perm(epoch)[j]) * self.block_size

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, 1_000_003, epoch])
            self._perm_cache = (epoch, rng.permutation(self._nblocks))
        return self._perm_cache[1]

    def _read(self, start: int, n: int, mask: bool = False) -> np.ndarray:
        """Tokens [start, start+n) of the virtual concatenation (a block may span shards)."""
        parts, pos, end = [], start, start + n
        k = int(np.searchsorted(self._offsets, pos, side="right")) - 1
        while pos < end:
            shard, base = self.split.shards[k], int(self._offsets[k])
            stop = min(end, int(self._offsets[k + 1]))
            src = shard.mask if mask else shard.tokens
            parts.append(np.asarray(src[pos - base:stop - base]))
            pos, k = stop, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def build_batch(rows: list[tuple[BlockLoader, int]], block_size: int,
                boundaries: bool) -> Batch:
    """A batch of one block per (loader, start): its tokens, the next tokens as targets (none
    where a loss mask says so), and with ``boundaries`` positions restarting at each document."""
    t = block_size
    tokens = np.stack([src._read(s, t + 1) for src, s in rows]).astype(np.int64)
    rows[0][0].split.check_ids(tokens)  # a mixture's sources share one vocabulary
    x, y = torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy())
    if any(src.split.shards[0].mask is not None for src, _ in rows):
        keep = np.stack([src._read(s + 1, t, mask=True).astype(bool)
                         if src.split.shards[0].mask is not None else np.ones(t, bool)
                         for src, s in rows])
        y[~torch.from_numpy(keep)] = IGNORE_INDEX
    batch = Batch(x, y)
    if boundaries:
        _add_boundaries(batch, rows, t)
    return batch


def _add_boundaries(batch: Batch, rows: list[tuple[BlockLoader, int]], t: int) -> None:
    pos = np.empty((len(rows), t), dtype=np.int64)
    cu = [0]
    for i, (src, s) in enumerate(rows):
        # document starts strictly inside the block cut it into segments
        starts = src._doc_starts
        inner = starts[(starts > s) & (starts < s + t)] - s
        edges = np.concatenate([[0], inner, [t]])
        for a, e in zip(edges[:-1], edges[1:]):
            pos[i, a:e] = np.arange(e - a)
            cu.append(i * t + int(e))
    batch.position_ids = torch.from_numpy(pos)
    batch.cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    batch.max_seqlen = int(np.max(np.diff(cu)))
