"""Cleaning and filters, one rule at a time, and MinHash near-duplicate detection."""

import numpy as np
import pytest

from fastlm.data import clean as C

CFG = C.CleanConfig()
WORDS = [f"word{i}" for i in range(24)]


def prose(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def test_normalize_nfc_controls_and_whitespace():
    text = "Cafe\u0301\x00 one\t\t two  \u00a0three   \r\nline\x07 end   \n\n\n\n\n\nnext"
    out = C.normalize(text, CFG)
    assert out == "Caf\u00e9 one two three\nline end\n\n\nnext"
    off = C.CleanConfig(normalize_unicode=False, strip_control=False, normalize_whitespace=False)
    assert C.normalize(text, off) == text


@pytest.mark.parametrize("text, cfg, reason", [
    ("", CFG, "empty"),
    ("   ", CFG, "empty"),
    ("short", C.CleanConfig(min_chars=10), "too_short"),
    ("x" * 50, C.CleanConfig(max_chars=10), "too_long"),
    ("same line here\n" * 5 + "other", CFG, "dup_lines"),
])
def test_filters_drop_with_reason(text, cfg, reason):
    assert C.filter_reason(text, cfg) == reason


def test_duplicate_line_characters_rule():
    # 1 of 4 lines duplicated (under the 30% line rule) but it holds most characters
    long_line = "a very long repeated line " * 10
    text = "\n".join([long_line, "x", long_line, "y"])
    assert C.filter_reason(text, CFG) == "dup_line_chars"


def test_top_ngram_rule_catches_repeated_phrases_not_prose():
    assert C.filter_reason(prose(300), CFG) is None
    spam = " ".join(["buy cheap pills now"] * 40 + [prose(60)])
    assert C.filter_reason(spam, CFG) in ("top_2gram", "top_3gram", "top_4gram")
    assert C.filter_reason(spam, C.CleanConfig(repetition=False)) is None


def test_minhash_estimates_jaccard():
    h = C.MinHasher()
    a = prose(400, seed=1)
    words = a.split()
    b = " ".join(words[:380] + prose(20, seed=2).split())  # ~90% of shingles shared
    c = prose(400, seed=3)
    same = np.mean(h.signature(a) == h.signature(b))
    other = np.mean(h.signature(a) == h.signature(c))
    assert same > 0.8 and other < 0.3
    assert np.array_equal(h.signature(a), C.MinHasher().signature(a))  # deterministic


def test_near_dedup_index():
    nd = C.NearDedup(CFG)
    h = C.MinHasher()
    a = prose(400, seed=1)
    b = a.replace("alpha", "ALPHA", 1)
    assert not nd.is_duplicate("a", h.signature(a))
    assert nd.is_duplicate("b", h.signature(b))
    assert not nd.is_duplicate("c", h.signature(prose(400, seed=5)))
    assert C.lsh_params(0.8, 128) == (9, 13)


def test_near_dedup_compact_index_decides_as_exact_bands(monkeypatch):
    """The compact index (signatures in blocks of rows, each band's key a 64-bit hash of its
    values) finds the duplicates a plain one does (byte strings of each band as keys, every
    signature kept as it came): random signatures with planted near copies (of documents in
    early and late blocks), blocks of 4 rows so the kept ones span many."""
    monkeypatch.setattr(C, "_BLOCK_BITS", 2)
    monkeypatch.setattr(C, "_BLOCK_MASK", 3)
    rng = np.random.default_rng(0)
    sigs = [rng.integers(0, 1 << 32, 128, dtype=np.uint64) for _ in range(40)]
    for src in (0, 1, 5, 17, 30, 30):
        copy = sigs[src].copy()
        flip = rng.choice(128, int(rng.integers(5, 40)), replace=False)  # 0.69-0.96 alike
        copy[flip] = rng.integers(0, 1 << 32, len(flip), dtype=np.uint64)
        sigs.insert(int(rng.integers(src + 1, len(sigs) + 1)), copy)

    bands, rows = C.lsh_params(CFG.near_dedup_threshold, CFG.num_perm)
    tables, kept, expected = [{} for _ in range(bands)], [], []
    for s in sigs:  # the plain index
        keys = [s[i * rows:(i + 1) * rows].tobytes() for i in range(bands)]
        cands = {c for t, k in zip(tables, keys) for c in t.get(k, ())}
        dup = any(np.mean(kept[c] == s) >= CFG.near_dedup_threshold for c in cands)
        expected.append(dup)
        if not dup:
            for t, k in zip(tables, keys):
                t.setdefault(k, []).append(len(kept))
            kept.append(s)
    nd = C.NearDedup(CFG)
    assert [nd.is_duplicate(str(i), s) for i, s in enumerate(sigs)] == expected
    assert 0 < sum(expected) < 6 and len(nd._blocks) > 5
