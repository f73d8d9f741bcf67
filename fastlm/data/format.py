"""The on-disk format written by ``fastlm prepare`` and read by the loader.

A prepared directory holds ``meta.json`` and, per split, shards of raw little-endian tokens
(``uint16`` when the vocabulary fits, else ``uint32``), each with an ``.idx.npy`` of document
start offsets (length docs+1; a document includes its trailing EOS) and, for SFT data, a
``.mask.bin`` of uint8 loss flags (1 = the token is a target). Shards are memory-mapped, so a
rank touches only the pages it reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "fastlm-tokens-v1"


class FormatError(Exception):
    """A prepared directory that is missing, incomplete or corrupt."""

    user_facing = True


@dataclass
class Shard:
    tokens: np.ndarray  # (n,) uint16/uint32 memmap
    doc_starts: np.ndarray  # (docs+1,) int64
    mask: np.ndarray | None  # (n,) uint8 memmap, SFT only


@dataclass
class Split:
    name: str
    shards: list[Shard]
    vocab_size: int
    eos_id: int

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.shards)

    def check_ids(self, tokens: np.ndarray) -> None:
        """Tokens read from this split lie inside its vocabulary: an id past it (shards and a
        meta.json that do not belong together, or a damaged shard) was an IndexError deep in
        the model's embedding. Checked as batches are read (a max over a batch, not a pass
        over the corpus)."""
        if tokens.size and (top := int(tokens.max())) >= self.vocab_size:
            raise FormatError(
                f"split {self.name!r} holds token id {top}, outside the vocabulary of "
                f"{self.vocab_size} its meta.json gives: the shards are damaged or do not "
                f"belong to this meta.json; re-run `fastlm prepare`")


def read_meta(root: str | Path) -> dict:
    root = Path(root)
    path = root / "meta.json"
    if not path.is_file():
        raise FormatError(
            f"{root} is not a prepared dataset (no meta.json); create one with "
            f"`fastlm prepare INPUT --out {root}`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); re-run `fastlm prepare`") from exc
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def open_split(root: str | Path, split: str) -> Split:
    """Memory-map every shard of ``split`` ("train" or "val"), checking sizes against meta."""
    root = Path(root)
    meta = read_meta(root)
    splits = meta.get("splits", {})
    if split not in splits:
        raise FormatError(f"{root}: no split {split!r} (has {sorted(splits)})")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    shards = []
    for info in splits[split]["shards"]:
        shards.append(_open_shard(root, info, dtype))
    if not shards or sum(len(s.tokens) for s in shards) == 0:
        raise FormatError(f"{root}: split {split!r} has no tokens; prepare more data")
    return Split(split, shards, int(meta["vocab_size"]), int(meta["eos_id"]))


def _open_shard(root: Path, info: dict, dtype: np.dtype) -> Shard:
    path = root / info["file"]
    if not path.is_file():
        raise FormatError(f"shard {path} listed in meta.json is missing; re-run `fastlm prepare`")
    n = path.stat().st_size // dtype.itemsize
    if n != info["tokens"] or path.stat().st_size % dtype.itemsize:
        raise FormatError(
            f"shard {path} holds {path.stat().st_size} bytes, meta.json says {info['tokens']} "
            f"{dtype.name} tokens: the shard is truncated or corrupt; re-run `fastlm prepare`"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    idx = info.get("index")
    starts = np.load(root / idx) if idx else np.array([0, n], dtype=np.int64)
    if len(starts) < 2 or starts[0] != 0 or starts[-1] != n or np.any(np.diff(starts) < 0):
        raise FormatError(f"document index {root / idx} does not match shard {path}")
    mask = None
    if info.get("mask"):
        mask = np.memmap(root / info["mask"], dtype=np.uint8, mode="r", shape=(n,))
    return Shard(tokens, starts.astype(np.int64), mask)


def write_split(root: str | Path, split: str, docs: list, *, dtype: str = "uint16",
                masks: list | None = None, shard_tokens: int = 1 << 28) -> dict:
    """Write ``docs`` (token sequences, EOS already appended) as shards of ``split`` under
    ``root``; returns the split's meta entry. Documents are never split across shards."""
    writer = SplitWriter(root, split, dtype=dtype, masks=masks is not None,
                         shard_tokens=shard_tokens)
    for i, d in enumerate(docs):
        writer.add(d, masks[i] if masks is not None else None)
    return writer.close()


class SplitWriter:
    """The shards of one split, written as the documents arrive: each document's tokens go
    straight to the open shard's file (memory holds the shard's document offsets alone, so a
    corpus of any size streams through), and the next shard opens when a document would not
    fit in this one (documents never span shards)."""

    def __init__(self, root: str | Path, split: str, *, dtype: str = "uint16",
                 masks: bool = False, shard_tokens: int = 1 << 28):
        self.root, self.split, self.masks = Path(root), split, masks
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.entry = {"tokens": 0, "docs": 0, "shards": []}
        self._bin = self._mask = None

    def add(self, doc, mask=None) -> None:
        toks = np.asarray(doc, dtype=self.dtype)
        if self._bin is not None and self._size + len(toks) > self.shard_tokens:
            self._close_shard()
        if self._bin is None:
            self._name = f"{self.split}_{len(self.entry['shards']):05d}"
            self._bin = open(self.root / f"{self._name}.bin", "wb")  # noqa: SIM115
            if self.masks:
                self._mask = open(self.root / f"{self._name}.mask.bin", "wb")  # noqa: SIM115
            self._sha, self._size, self._starts = hashlib.sha256(), 0, [0]
        data = toks.tobytes()
        self._bin.write(data)
        self._sha.update(data)
        if self.masks:
            self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self._size += len(toks)
        self._starts.append(self._size)

    def close(self) -> dict:
        """The split's meta entry."""
        if self._bin is not None:
            self._close_shard()
        return self.entry

    def _close_shard(self) -> None:
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        np.save(self.root / f"{self._name}.idx.npy", np.asarray(self._starts, dtype=np.int64))
        docs = len(self._starts) - 1
        self.entry["shards"].append({
            "file": f"{self._name}.bin", "tokens": self._size, "docs": docs,
            "sha256": self._sha.hexdigest(), "index": f"{self._name}.idx.npy",
            "mask": f"{self._name}.mask.bin" if self.masks else None,
        })
        self.entry["tokens"] += self._size
        self.entry["docs"] += docs
        self._bin = self._mask = None
