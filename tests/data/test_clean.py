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
