"""Tokenizing documents for the shards: fastlm's C++ byte-level BPE encoder where the tokenizer
is one it reproduces exactly, else the `tokenizers` library.

The C++ encoder (``csrc/text/bpe.cpp``) serves tokenizers made of a ByteLevel pre-tokenizer
(GPT-2's regex, no prefix space) and a plain BPE model: the ones ``fastlm prepare`` trains, and
GPT-2's. Any other tokenizer, and any document it cannot vouch for (a code point Python's
Unicode database does not know, or an added token's text where that token strips spaces or
matches whole words only), goes through the library, so the ids are always the library's.
A document holding added tokens' text (a chat template's markers, ``<|endoftext|>``) is split
at them here, as the library splits it, and the text between encoded natively.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import unicodedata

import numpy as np

from fastlm.data import native
from fastlm.data.native import ptr

# Code point classes of the pre-tokenizer's regex (see csrc/text/bpe.cpp).
OTHER, LETTER, NUMBER, SPACE, UNSURE = 0, 1, 2, 3, 4
# Oniguruma's \s (the tokenizers library's regex engine): Unicode's White_Space property.
WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
               0x2029, 0x202F, 0x205F, 0x3000]


def char_classes() -> np.ndarray:
    """(0x110000,) uint8 class of every code point, from Python's Unicode database (cached on
    disk, named by the Unicode version and a hash of this module's rules: computing it takes
    ~0.5 s)."""
    rules = repr((WHITE_SPACE, OTHER, LETTER, NUMBER, SPACE, UNSURE, ("Cn", "Cs"), "L", "N"))
    return _char_classes(unicodedata.unidata_version,
                         hashlib.sha256(rules.encode()).hexdigest()[:12])


@functools.cache
def _char_classes(version: str, rules: str) -> np.ndarray:
    path = native.cache_root() / f"text-char-classes-{version}-{rules}.npy"
    try:
        table = np.load(path)
        if table.shape == (0x110000,) and table.dtype == np.uint8:
            return table
    except (OSError, ValueError):
        pass
    kind = {"L": LETTER, "N": NUMBER}
    table = np.fromiter(
        (UNSURE if (cat := unicodedata.category(chr(cp))) in ("Cn", "Cs") else kind.get(cat[0], OTHER)
         for cp in range(0x110000)), dtype=np.uint8, count=0x110000)
    table[WHITE_SPACE] = SPACE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    try:  # the cache only saves time: a read-only cache directory is not an error
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, table)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return table


class NativeBpe:
    """The C++ encoder for one tokenizer. :meth:`for_tokenizer` returns None where the
    tokenizer is not one it reproduces (or the library cannot be built)."""

    def __init__(self, lib, byte_ids, left, right, merged, added: list[dict]):
        self._lib = lib
        self._specials = [t["content"] for t in added if t["content"]]
        self._ids = {t["content"]: t["id"] for t in added}
        # The library finds added tokens leftmost-longest, those it does not normalize first,
        # then the others in the text between (the same text: these tokenizers normalize
        # nothing). Tokens that strip spaces or match whole words alone are not reproduced:
        # documents holding them go to the library.
        plain = all(not t.get(k) for t in added for k in ("lstrip", "rstrip", "single_word"))
        self._splitters = None if not plain else [
            re.compile("|".join(re.escape(c) for c in sorted(group, key=len, reverse=True)))
            for group in ([t["content"] for t in added if not t.get("normalized") and t["content"]],
                          [t["content"] for t in added if t.get("normalized") and t["content"]])
            if group]
        # fastlm_bpe_new copies all of these: nothing needs to outlive the call
        self._model = lib.fastlm_bpe_new(ptr(byte_ids), ptr(left), ptr(right), ptr(merged),
                                         len(left), ptr(char_classes()))

    def __del__(self):
        if getattr(self, "_model", None):
            self._lib.fastlm_bpe_free(self._model)
            self._model = None  # freed once, even if __del__ runs again

    @classmethod
    def for_tokenizer(cls, backend) -> NativeBpe | None:
        """``backend``: a ``tokenizers.Tokenizer`` (``PreTrainedTokenizerFast.backend_tokenizer``)."""
        spec = json.loads(backend.to_str())
        if not _supported(spec):
            return None
        lib = native.load()
        if lib is None:
            return None
        model = spec["model"]
        vocab = model["vocab"]
        decode = _byte_decoder()
        raw_vocab = {}
        for token, i in vocab.items():
            try:
                raw_vocab[bytes(decode[ch] for ch in token)] = i
            except KeyError:  # not a byte-level token (an added token's text): never merged to
                continue
        byte_ids = np.array([raw_vocab.get(bytes([b]), -1) for b in range(256)], dtype=np.int32)
        if (byte_ids < 0).any():
            return None  # the library would map such a byte to an unknown token: let it
        left, right, merged = [], [], []
        for m in model["merges"]:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a + b not in vocab or a not in vocab or b not in vocab:
                return None  # a malformed merge table: the library's behaviour is the rule
            left.append(vocab[a])
            right.append(vocab[b])
            merged.append(vocab[a + b])
        arr = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
        return cls(lib, byte_ids, arr(left), arr(right), arr(merged),
                   spec.get("added_tokens") or [])

    def encode(self, texts: list[str], threads: int | None = None) -> tuple[list[np.ndarray], list[int]]:
        """Token ids of each text (int32 arrays), and the indices of the texts the encoder left
        to the caller (their arrays are empty)."""
        blobs: list[bytes] = []
        # each text's parts: an index into blobs (text to encode), or -1 - id (an added token)
        plans: list[list[int] | None] = []
        for t in texts:
            parts = [t] if not any(s in t for s in self._specials) else self._split(t)
            if parts is None:
                plans.append(None)
                continue
            plan = []
            for part in parts:
                if isinstance(part, int):
                    plan.append(-1 - part)
                else:
                    plan.append(len(blobs))
                    blobs.append(part.encode("utf-8", "surrogatepass"))
            plans.append(plan)
        text, offsets = native.pack(blobs)
        out = np.empty(max(1, int(offsets[-1])), dtype=np.int32)
        out_offsets = np.empty(len(blobs) + 1, dtype=np.int64)
        unsure = np.zeros(max(1, len(blobs)), dtype=np.uint8)
        total = self._lib.fastlm_bpe_encode(self._model, ptr(text), ptr(offsets), len(blobs),
                                            threads or _cpus(), ptr(out),
                                            ptr(out_offsets), ptr(unsure))
        ids = out[:total]
        encoded = [ids[out_offsets[b]:out_offsets[b + 1]] for b in range(len(blobs))]
        pieces, left, nothing = [], [], np.empty(0, dtype=np.int32)
        for d, plan in enumerate(plans):
            if plan is None or any(b >= 0 and unsure[b] for b in plan):
                left.append(d)
                pieces.append(nothing)
            elif len(plan) == 1 and plan[0] >= 0:
                pieces.append(encoded[plan[0]])
            else:
                pieces.append(np.concatenate(
                    [encoded[b] if b >= 0 else np.array([-1 - b], dtype=np.int32) for b in plan]))
        return pieces, left

    def _split(self, text: str) -> list[str | int] | None:
        """``text`` as the library splits it at added tokens: the text between (non-empty) and
        each token's id; None where this encoder does not reproduce the split."""
        if self._splitters is None:
            return None
        parts: list[str | int] = [text]
        for splitter in self._splitters:
            out: list[str | int] = []
            for part in parts:
                if isinstance(part, int):
                    out.append(part)
                    continue
                at = 0
                for m in splitter.finditer(part):
                    if m.start() > at:
                        out.append(part[at:m.start()])
                    out.append(self._ids[m.group()])
                    at = m.end()
                if at < len(part):
                    out.append(part[at:])
            parts = out
        return parts


def pretokenize(text: str) -> list[tuple[int, int]] | None:
    """(start, end) character offsets of the C++ pre-tokenizer's pieces of ``text``, in the
    form of the library's ``pre_tokenizers.ByteLevel().pre_tokenize_str`` (tests compare the
    two); None where the text holds a code point of unsure class."""
    lib = native.load()
    data, offsets = native.pack([text.encode("utf-8", "surrogatepass")])
    n = int(offsets[-1])
    ends = np.empty(max(1, n), dtype=np.int64)
    k = lib.fastlm_pretokenize(ptr(char_classes()), ptr(data), n, ptr(ends))
    if k < 0:
        return None
    chars = np.concatenate(([0], np.cumsum((data[:n] & 0xC0) != 0x80)))  # byte -> char offset
    cuts = [0] + [int(chars[e]) for e in ends[:k]]
    return list(zip(cuts[:-1], cuts[1:]))


def _cpus() -> int:
    """CPUs this process may run on (the affinity mask under taskset/cgroups)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _supported(spec: dict) -> bool:
    """Is this tokenizer.json one the C++ encoder reproduces id for id?"""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
            and pre.get("use_regex", True)
            and model.get("type") == "BPE" and not model.get("dropout")
            and not model.get("byte_fallback") and not model.get("ignore_merges")
            and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix"))


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from fastlm.data.tokenizer import _bytes_to_unicode

    return {ch: b for b, ch in enumerate(_bytes_to_unicode())}


def encode_documents(tok, texts: list[str], eos: int | None,
                     threads: int | None = None) -> list[np.ndarray]:
    """Token ids of each text (plus ``eos`` unless None), as the tokenizer ``tok`` (a fast HF
    tokenizer) gives them without special tokens: natively where possible, else by the
    library."""
    backend = tok.backend_tokenizer
    enc = _native_for(backend)
    tail = [] if eos is None else [eos]
    if enc is None:
        return [np.array(e.ids + tail, dtype=np.int64)
                for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    pieces, left = enc.encode(texts, threads)
    if left:
        redo = backend.encode_batch_fast([texts[d] for d in left], add_special_tokens=False)
        for d, e in zip(left, redo):
            pieces[d] = np.asarray(e.ids, dtype=np.int32)
    eos_arr = np.array(tail, dtype=np.int64)
    return [np.concatenate((p, eos_arr)) for p in pieces]


_LAST: list = [None, None]  # (tokenizer, its encoder): the pipeline encodes with one at a time


def _native_for(backend) -> NativeBpe | None:
    if _LAST[0] is not backend:
        _LAST[:] = [backend, NativeBpe.for_tokenizer(backend)]
    return _LAST[1]
