"""Cleaning a batch of documents: the C++ kernels of ``csrc/text/clean.cpp`` when the text
library is available, else the Python references of :mod:`fastlm.data.clean` (same results;
tests compare them). One entry point, :func:`clean_batch`, used by the pipeline's parallel map.
"""

from __future__ import annotations

import ctypes
import functools
import unicodedata

import numpy as np

from fastlm.data import clean as C
from fastlm.data import native
from fastlm.data.native import ptr

_BASE_REASONS = (None, "empty", "too_short", "too_long", "dup_lines", "dup_line_chars")


class _Params(ctypes.Structure):
    _fields_ = [("min_chars", ctypes.c_int64), ("max_chars", ctypes.c_int64),
                ("repetition", ctypes.c_int32), ("max_dup_line_frac", ctypes.c_double),
                ("max_dup_line_char_frac", ctypes.c_double), ("n_ngrams", ctypes.c_int32),
                ("ngram_n", ctypes.c_void_p), ("ngram_limit", ctypes.c_void_p),
                ("min_words_for_ngrams", ctypes.c_int64), ("near_dedup", ctypes.c_int32),
                ("num_perm", ctypes.c_int32), ("shingle", ctypes.c_int32),
                ("perm_a", ctypes.c_void_p), ("perm_b", ctypes.c_void_p)]


def clean_batch(texts: list[str], cfg: C.CleanConfig, *, use_native: bool | None = None):
    """Normalise, filter and sign ``texts``: (normalised texts, drop reasons or None,
    (n, num_perm) uint64 MinHash signatures, zeros for dropped documents; (n, 0) without
    near-dedup)."""
    lib = native.load() if use_native in (None, True) else None
    if use_native and lib is None:
        raise RuntimeError("fastlm's C++ text kernels are unavailable (see the warning above)")
    if lib is None:
        return _python(texts, cfg)
    return _native(lib, texts, cfg)


def normalize_batch(texts: list[str], cfg: C.CleanConfig, *,
                    use_native: bool | None = None) -> list[str]:
    """:func:`fastlm.data.clean.normalize` of each text (fine-tuning messages, which are
    normalised but not filtered), by the C++ kernel where it is available."""
    lib = native.load() if use_native in (None, True) else None
    if lib is None:
        return [C.normalize(t, cfg) for t in texts]
    return _normalized(lib, texts, cfg)[0]


def _normalized(lib, texts, cfg):
    """(normalised texts, their UTF-8 bytes packed, offsets) by the C++ kernel."""
    n = len(texts)
    if cfg.normalize_unicode:  # NFC in Python; ASCII is already NFC
        texts = [t if t.isascii() else unicodedata.normalize("NFC", t) for t in texts]
    raw, offsets = native.pack([t.encode() for t in texts])
    normed = np.empty(max(1, int(offsets[-1])), dtype=np.uint8)
    out_offsets = np.empty(n + 1, dtype=np.int64)
    lib.fastlm_clean_normalize(ptr(raw), ptr(offsets), n, int(cfg.strip_control),
                               int(cfg.normalize_whitespace), ptr(normed), ptr(out_offsets))
    data = normed.tobytes()
    out = [data[out_offsets[d]:out_offsets[d + 1]].decode() for d in range(n)]
    return out, normed, out_offsets


def _python(texts, cfg):
    hasher = C.MinHasher(cfg.num_perm, cfg.shingle) if cfg.near_dedup else None
    sigs = np.zeros((len(texts), cfg.num_perm if hasher else 0), dtype=np.uint64)
    out, reasons = [], []
    for i, raw in enumerate(texts):
        text = C.normalize(raw, cfg)
        w = C.words(text)  # shared by the repetition rules and MinHash
        reason = C.filter_reason(text, cfg, w)
        out.append(text)
        reasons.append(reason)
        if hasher and not reason:
            sigs[i] = hasher.signature(text, w[0])
    return out, reasons, sigs


@functools.cache
def _permutations(num_perm: int, shingle: int) -> tuple[np.ndarray, np.ndarray]:
    h = C.MinHasher(num_perm, shingle)
    return np.ascontiguousarray(h.a), np.ascontiguousarray(h.b)


def _native(lib, texts, cfg):
    n = len(texts)
    out, normed, out_offsets = _normalized(lib, texts, cfg)
    ngrams = sorted(cfg.max_top_ngram_char_frac.items())
    ns = np.array([k for k, _ in ngrams], dtype=np.int32)
    limits = np.array([v for _, v in ngrams], dtype=np.float64)
    a, b = _permutations(cfg.num_perm, cfg.shingle) if cfg.near_dedup else (ns, ns)
    params = _Params(cfg.min_chars, -1 if cfg.max_chars is None else cfg.max_chars,
                     int(cfg.repetition), cfg.max_dup_line_frac, cfg.max_dup_line_char_frac,
                     len(ns), ptr(ns), ptr(limits), cfg.min_words_for_ngrams,
                     int(cfg.near_dedup), cfg.num_perm, cfg.shingle, ptr(a), ptr(b))
    codes = np.empty(max(1, n), dtype=np.int32)
    sigs = np.zeros((n, cfg.num_perm if cfg.near_dedup else 0), dtype=np.uint64)
    lib.fastlm_clean_filter(ptr(normed), ptr(out_offsets), n, ctypes.byref(params),
                            ptr(codes), ptr(sigs) if sigs.size else None)
    names = _BASE_REASONS + tuple(f"top_{k}gram" for k in ns.tolist())
    return out, [names[c] for c in codes[:n].tolist()], sigs
