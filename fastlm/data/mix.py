"""Several prepared datasets mixed in fixed proportions (``data.mix``), one sample stream.

Every chunk of 4096 consecutive samples of the global stream holds each source's share
exactly (the largest-remainder rounding of ``weight x 4096``), in an order shuffled by
(seed, chunk) alone; a source's ``k``-th sample is its own loader's sample ``k``, so each
source is read as it would be alone (random windows, or epochs of its blocks that a small,
heavily weighted source repeats). As with one dataset, a step's data depends neither on the
number of ranks nor on the micro-batch size, and the micro-batch counter is the whole state:
a resume continues every source where it stopped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fastlm.data.format import FormatError, read_meta
from fastlm.data.loader import BlockLoader, _SampleStream


class MixedLoader(_SampleStream):
    _CHUNK = 4096
    _KEEP = (*_SampleStream._KEEP, "mix")

    def __init__(self, mix: dict[str, float], block_size: int, batch_size: int, *,
                 split_name: str = "train", rank: int = 0, world_size: int = 1, seed: int = 0,
                 mode: str = "random", boundaries: bool = False):
        if not mix:
            raise ValueError("data.mix: give at least one dataset directory and its weight")
        bad = {p: w for p, w in mix.items()
               if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0}
        if bad:
            raise ValueError(f"data.mix: weights must be positive numbers, got {bad}")
        total = sum(mix.values())
        self.mix = {str(p): w / total for p, w in mix.items()}
        _check_one_vocabulary(list(self.mix))
        # each source its own stream (seed + i: sources do not draw the same offsets)
        self.sources = [BlockLoader(p, block_size, batch_size, split_name=split_name,
                                    seed=seed + i, mode=mode, boundaries=boundaries)
                        for i, p in enumerate(self.mix)]
        self.split = self.sources[0].split  # vocabulary and EOS: the same in all
        self.block_size, self.batch_size, self.boundaries = block_size, batch_size, boundaries
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.rank, self.world_size, self.seed, self.mode = rank, world_size, seed, mode
        self.step = 0
        self._per_chunk = _apportion(list(self.mix.values()), self._CHUNK)
        if min(self._per_chunk) == 0:
            small = [p for p, n in zip(self.mix, self._per_chunk) if n == 0]
            raise ValueError(f"data.mix: {small} weigh less than 1/{self._CHUNK} of the mix; "
                             f"raise their weights or leave them out")
        self._chunk_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mix": self.mix}

    def _row(self, c: int) -> tuple[BlockLoader, int]:
        k, j = divmod(c, self._CHUNK)
        if self._chunk_cache is None or self._chunk_cache[0] != k:
            order = np.random.default_rng([self.seed, 2_000_003, k]).permutation(
                np.repeat(np.arange(len(self.sources)), self._per_chunk))
            # how many of the chunk's earlier samples came from the same source
            nth = np.empty(self._CHUNK, np.int64)
            for i in range(len(self.sources)):
                at = np.flatnonzero(order == i)
                nth[at] = np.arange(len(at))
            self._chunk_cache = (k, order, nth)
        _, order, nth = self._chunk_cache
        i = int(order[j])
        src = self.sources[i]
        return src, src._sample_start(k * int(self._per_chunk[i]) + int(nth[j]))


def _apportion(weights: list[float], n: int) -> list[int]:
    """Integers summing to ``n`` in the proportions ``weights`` (largest remainders)."""
    exact = np.asarray(weights, float) * n / sum(weights)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[:n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _check_one_vocabulary(paths: list[str]) -> None:
    """Every source tokenized alike: the same vocabulary size, EOS and tokenizer files."""
    seen = None
    for p in paths:
        meta = read_meta(p)
        tok = Path(p) / meta.get("tokenizer", "tokenizer") / "tokenizer.json"
        sig = (meta["vocab_size"], meta["eos_id"],
               hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None)
        if seen is not None and sig != seen[1]:
            raise FormatError(f"data.mix: {p} was tokenized otherwise than {seen[0]} (vocabulary "
                              f"{sig[0]} vs {seen[1][0]}, EOS {sig[1]} vs {seen[1][1]}, "
                              f"tokenizer.json {'differs' if sig[2] != seen[1][2] else 'same'}); "
                              f"prepare every source with the same --tokenizer")
        seen = seen or (p, sig)
