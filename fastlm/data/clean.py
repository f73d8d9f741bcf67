"""Document cleaning and quality filters, each on by default, each counted.

Normalisation (Unicode NFC, control characters, whitespace) rewrites a document; filters drop
it with a reason. The repetition filters are the Gopher rules (Rae et al. 2021, table A1):
documents whose lines or word n-grams repeat too much are boilerplate or spam. Word n-gram
statistics are computed on 64-bit word ids with numpy, not Python tuples.

These functions are the reference: ``fastlm prepare`` runs their C++ versions
(``csrc/text/clean.cpp`` via :mod:`fastlm.data.clean_native`, 8x faster, identical results)
and falls back to them, with a warning, where the C++ library cannot be built.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from fastlm.data.errors import DataError

# C0/C1 control characters except tab and newline; DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{4,}")  # more than 2 consecutive blank lines


@dataclass
class CleanConfig:
    """What cleaning does; every step can be switched off."""

    normalize_unicode: bool = True  # NFC
    strip_control: bool = True
    normalize_whitespace: bool = True
    min_chars: int = 1  # shorter documents are dropped ("too_short")
    max_chars: int | None = None  # longer ones are dropped ("too_long")
    repetition: bool = True  # the Gopher line / n-gram repetition rules below
    max_dup_line_frac: float = 0.30  # share of lines that are duplicates
    max_dup_line_char_frac: float = 0.20  # share of characters in duplicate lines
    max_top_ngram_char_frac: dict = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    min_words_for_ngrams: int = 50  # n-gram rules are noise on very short texts
    dedup: bool = True  # exact duplicates of the normalised text
    near_dedup: bool = True  # MinHash LSH
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of word 5-shingles
    num_perm: int = 128
    shingle: int = 5

    def check(self) -> None:
        """A DataError naming a setting that means nothing (a near-dedup threshold of 2 kept
        every near copy without a word)."""
        if not 0 < self.near_dedup_threshold <= 1:
            raise DataError(f"near_dedup_threshold is a Jaccard similarity in (0, 1], got "
                            f"{self.near_dedup_threshold}")
        if self.min_chars < 0 or (self.max_chars is not None
                                  and self.max_chars < max(1, self.min_chars)):
            raise DataError(f"min_chars must be >= 0 and max_chars (if set) >= min_chars and "
                            f">= 1, got {self.min_chars} and {self.max_chars}")
        if self.num_perm < 1 or self.shingle < 1:
            raise DataError(f"num_perm and shingle must be >= 1, got {self.num_perm} and "
                            f"{self.shingle}")


def normalize(text: str, cfg: CleanConfig) -> str:
    if cfg.normalize_unicode and not text.isascii():  # ASCII is already NFC
        text = unicodedata.normalize("NFC", text)
    if cfg.strip_control:
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if cfg.normalize_whitespace:
        text = _SPACES.sub(" ", text)
        text = _TRAILING.sub("\n", text)
        text = _BLANKS.sub("\n\n\n", text).strip()
    return text


_P = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True


def words(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths) of the ASCII-whitespace-separated words, vectorised over the UTF-8 bytes:
    id = polynomial hash of the word's bytes mod 2^64 from one prefix sum, deterministic across
    processes (unlike Python's salted hash) and ~10x faster than hashing words one by one.
    Lengths are in bytes."""
    b = np.frombuffer(text.encode(), dtype=np.uint8)
    if len(b) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    space = _SPACE[b]
    edges = np.diff(np.concatenate(([True], space, [True])).astype(np.int8))
    starts = np.flatnonzero(edges == -1)  # first byte of each word
    ends = np.flatnonzero(edges == 1)  # one past its last byte
    one = np.ones(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        # P^i and P^-i (mod 2^64) for i = 0..n-1
        powers = np.concatenate((one, np.cumprod(np.full(len(b) - 1, _P, dtype=np.uint64))))
        inv = np.concatenate((one, np.cumprod(np.full(len(b) - 1, _P_INV, dtype=np.uint64))))
        terms = (b.astype(np.uint64) + one) * powers
        prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)))
        ids = (prefix[ends] - prefix[starts]) * inv[starts]  # hash independent of position
    return ids, (ends - starts).astype(np.int64)


def word_ids(text: str) -> np.ndarray:
    return words(text)[0]


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per word n-gram (polynomial combination of the word ids)."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(1_000_003) + ids[k:len(ids) - n + 1 + k]
    return h


def repetition_reason(text: str, w: tuple[np.ndarray, np.ndarray],
                      cfg: CleanConfig) -> str | None:
    """Gopher repetition rules; ``w`` = :func:`words` of the text."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) > 1:
        seen, dup_lines, dup_chars = set(), 0, 0
        for ln in lines:
            if ln in seen:
                dup_lines += 1
                dup_chars += len(ln)
            else:
                seen.add(ln)
        if dup_lines / len(lines) > cfg.max_dup_line_frac:
            return "dup_lines"
        if dup_chars / max(1, len(text)) > cfg.max_dup_line_char_frac:
            return "dup_line_chars"
    ids, lengths = w
    if len(ids) < cfg.min_words_for_ngrams:
        return None
    total = max(1, int(lengths.sum()))
    for n, limit in sorted(cfg.max_top_ngram_char_frac.items()):
        if len(ids) < n:
            continue
        hashes = _ngram_hashes(ids, n)
        srt = np.sort(hashes)  # run lengths of the sorted hashes = n-gram counts
        cuts = np.flatnonzero(srt[1:] != srt[:-1]) + 1
        counts = np.diff(np.concatenate(([0], cuts, [len(srt)])))
        top = int(np.argmax(counts))
        if counts[top] < 2:
            continue
        first = int(np.argmax(hashes == srt[0 if top == 0 else cuts[top - 1]]))
        chars = int(lengths[first:first + n].sum())
        if int(counts[top]) * chars / total > limit:
            return f"top_{n}gram"
    return None


def filter_reason(text: str, cfg: CleanConfig,
                  w: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
    """Why a normalised document is dropped, or None to keep it (``w``: its :func:`words`,
    if already computed)."""
    if len(text) < cfg.min_chars or not text.strip():
        return "too_short" if text.strip() else "empty"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if cfg.repetition:
        return repetition_reason(text, w if w is not None else words(text), cfg)
    return None


class MinHasher:
    """MinHash signatures of word shingles, vectorised: one (shingles x num_perm) hash per
    document instead of a Python loop per shingle (datasketch's MinHash.update)."""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        # multiply-shift hashing (Dietzfelbinger): odd a, h(x) = (a*x + b) >> 32 mod 2^64 —
        # a universal family with no modulo, several times faster than (a*x+b) mod p in numpy
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + \
            np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
        self.num_perm, self.shingle = num_perm, shingle

    def signature(self, text: str, ids: np.ndarray | None = None) -> np.ndarray:
        ids = word_ids(text) if ids is None else ids
        n = min(self.shingle, max(1, len(ids)))
        if len(ids) == 0:
            return np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        sh = np.unique(_ngram_hashes(ids, n))  # (shingles,) 64-bit
        with np.errstate(over="ignore"):
            h = (sh[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
        return h.min(axis=0)  # (num_perm,) values < 2^32


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the summed false-positive and false-negative probability
    mass of banded LSH at ``threshold`` (the standard criterion; Leskovec et al., ch. 3)."""
    xs = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - xs**r) ** b  # probability of becoming a candidate at similarity x
            fp = np.trapezoid(p[xs < threshold], xs[xs < threshold])
            fn = np.trapezoid(1.0 - p[xs >= threshold], xs[xs >= threshold])
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


_BLOCK_BITS = 14  # NearDedup's signatures: 16384 a block (8 MB at 128 permutations)
_BLOCK_MASK = (1 << _BLOCK_BITS) - 1


class NearDedup:
    """Near-duplicate detection with MinHash LSH: signatures are cut into bands; documents
    sharing a band are candidates, and a candidate whose estimated Jaccard similarity (share
    of equal signature values) reaches the threshold makes the later document a duplicate.
    Banding is a dict lookup per band (about 10 per document), so the index keeps up with the
    vectorised signatures.

    Memory is what a large corpus needs of it, ~1 KB a kept document: the kept signatures in
    one uint32 array (their values are < 2^32), each band's key a 64-bit hash of its values,
    and a table entry holding an index, a list only where documents share the band. (Byte
    strings of each band, lists everywhere and one array object a signature took 3.4 KB.)"""

    def __init__(self, cfg: CleanConfig):
        self.threshold = cfg.near_dedup_threshold
        self.bands, self.rows = lsh_params(cfg.near_dedup_threshold, cfg.num_perm)
        self.tables: list[dict] = [{} for _ in range(self.bands)]
        # blocks of rows, never copied as they grow (a doubling array held the old and the new
        # copy at once, 2-3x the signatures' bytes)
        self._blocks: list[np.ndarray] = []
        self._n = 0
        # odd multipliers: a band's key is sum(value_i * m_i) mod 2^64, which two different
        # bands share with negligible probability (and a shared key only adds a candidate,
        # whose similarity is then checked)
        rng = np.random.default_rng(12345)
        self._mult = rng.integers(0, 1 << 63, size=(self.bands, self.rows), dtype=np.uint64) \
            * np.uint64(2) + np.uint64(1)

    def is_duplicate(self, key: str, signature: np.ndarray) -> bool:
        b, r = self.bands, self.rows
        with np.errstate(over="ignore"):
            band_keys = (signature[:b * r].astype(np.uint64).reshape(b, r) * self._mult) \
                .sum(axis=1, dtype=np.uint64).tolist()
        candidates = set()
        for table, bk in zip(self.tables, band_keys):
            hit = table.get(bk)
            if hit is not None:
                candidates.update(hit if isinstance(hit, list) else (hit,))
        for c in candidates:
            kept = self._blocks[c >> _BLOCK_BITS][c & _BLOCK_MASK]
            if np.mean(kept == signature) >= self.threshold:
                return True
        idx = self._n
        if idx & _BLOCK_MASK == 0:
            self._blocks.append(np.empty((_BLOCK_MASK + 1, len(signature)), dtype=np.uint32))
        self._blocks[-1][idx & _BLOCK_MASK] = signature
        self._n += 1
        for table, bk in zip(self.tables, band_keys):
            hit = table.get(bk)
            if hit is None:
                table[bk] = idx
            elif isinstance(hit, list):
                hit.append(idx)
            else:
                table[bk] = [hit, idx]
        return False
