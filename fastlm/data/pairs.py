"""Preference pairs for DPO: prepared by ``fastlm prepare --preference`` as consecutive
documents (chosen, then rejected; the loss mask on each last answer), read a pair at a time.

Sample ``c`` of the global stream is pair ``perm_e[j]`` (``e, j = divmod(c, pairs)``, a
seeded permutation per epoch: every pair once an epoch), so as for blocks a step's pairs depend
neither on the number of ranks nor on the micro-batch, and the micro-batch counter is the whole
state. A micro-batch of B pairs is 2B rows, the B chosen then the B rejected, each its whole
conversation (cut at ``block_size`` + 1 tokens), right-padded: the padding comes after every
real token, so a causal model reads the rows as if alone, and its targets are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastlm.data.format import FormatError, Split, open_split, read_meta
from fastlm.data.loader import IGNORE_INDEX, Batch, BlockLoader, _SampleStream


class PairLoader(_SampleStream):
    def __init__(self, split: Split | str | Path, block_size: int, batch_size: int, *,
                 split_name: str = "train", rank: int = 0, world_size: int = 1, seed: int = 0):
        if not isinstance(split, Split):
            if not read_meta(split).get("preference"):
                raise FormatError(f"{split} holds no preference pairs: prepare them with "
                                  f"`fastlm prepare FILE --preference --out DIR`")
            split = open_split(split, split_name)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self._reader = BlockLoader(split, 1, 1)  # its reads over shards and document starts
        self.split = split
        starts = np.concatenate([self._reader._doc_starts, [self._reader._total]])
        if (len(starts) - 1) % 2 or len(starts) < 3:
            raise FormatError(f"split {split.name!r} holds {len(starts) - 1} documents, not "
                              f"pairs of them; prepare it with `fastlm prepare --preference`")
        self._starts = starts
        self.pairs = (len(starts) - 1) // 2
        self.block_size, self.batch_size, self.boundaries = block_size, batch_size, False
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, "pairs"
        self.step = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._pad = split.eos_id
        # (pairs, 2) float64: each pair's chosen and rejected log-probability under DPO's
        # reference, when precomputed (train.dpo_precompute_reference); batches carry theirs
        self.reference: torch.Tensor | None = None

    def batch_at(self, step: int) -> Batch:
        b = self.batch_size
        first = (step * self.world_size + self.rank) * b
        return self.batch_of([self._pair(c) for c in range(first, first + b)])

    def batch_of(self, pairs: list[int]) -> Batch:
        """The rows of these pairs (indices in the split's stored order): the chosen answers,
        then the rejected ones."""
        rows = [self._doc(2 * p) for p in pairs] + [self._doc(2 * p + 1) for p in pairs]
        width = max(len(tokens) for tokens, _ in rows) - 1
        x = torch.full((len(rows), width), self._pad, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (tokens, keep) in enumerate(rows):
            n = len(tokens) - 1
            x[i, :n] = torch.from_numpy(tokens[:-1])
            target = torch.from_numpy(tokens[1:].copy())
            target[~torch.from_numpy(keep[1:].astype(bool))] = IGNORE_INDEX
            y[i, :n] = target
        ref = None
        if self.reference is not None:
            ref = torch.cat([self.reference[pairs, 0], self.reference[pairs, 1]])
        return Batch(x, y, ref_logps=ref)

    def _pair(self, c: int) -> int:
        epoch, j = divmod(c, self.pairs)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, 3_000_017, epoch])
            self._perm_cache = (epoch, rng.permutation(self.pairs))
        return int(self._perm_cache[1][j])

    def _doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, e = int(self._starts[i]), int(self._starts[i + 1])
        e = min(e, a + self.block_size + 1)  # a longer conversation is cut at the block
        tokens = self._reader._read(a, e - a).astype(np.int64)
        self.split.check_ids(tokens)
        mask = self._reader._read(a, e - a, mask=True)
        return tokens, mask
