"""fastlm's C++ text kernels (csrc/text) against their references: the BPE encoder against
the `tokenizers` library id for id, the cleaning kernels against fastlm.data.clean's Python,
and the announced fallback when the library cannot be built."""

import dataclasses
import json
import random
import warnings
from pydoc_data.topics import topics

import numpy as np
import pytest

from fastlm.data import bpe_native as B
from fastlm.data import clean as C
from fastlm.data import clean_native, native, prepare
from fastlm.data.tokenizer import train_bpe

TEXT = list(topics.values())


@pytest.fixture(scope="module")
def lib():
    lib = native.load()
    assert lib is not None, "the text kernels must build on the test machine"
    return lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory, lib):
    return train_bpe(TEXT[::3], 2000, tmp_path_factory.mktemp("tok") / "bpe")


def library_ids(tok, texts):
    return [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def assert_same_ids(got, ref, texts):
    """Equal id lists, reporting the first differing document briefly (pytest's diff of
    thousands of long lists takes minutes)."""
    assert len(got) == len(ref)
    bad = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    if bad is not None:
        a, b = got[bad], ref[bad]
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(f"document {bad} ({texts[bad][:60]!r}...) differs at token {k}: "
                             f"{a[k:k + 5]} vs the library's {b[k:k + 5]}")


def native_ids(tok, texts, threads=2):
    enc = B.NativeBpe.for_tokenizer(tok.backend_tokenizer)
    assert enc is not None
    pieces, left = enc.encode(texts, threads)
    return [p.tolist() for p in pieces], left


# -- BPE ------------------------------------------------------------------------------------

AWKWARD = [
    "", " ", "  ", "\n", "a", "'s", "''s", " 's", "it's they're we've I'm you'll he'd",
    "IT'S 'S 'Re", "x  \n\n  y", "trailing spaces   ", "   leading", "tab\tsep\t\tarated",
    "a\u00a0b\u2009c\u3000d", "line\u2028sep", "numbers 123 4.5 ٣٤ Ⅻ ½", "émoji 🙂🙂 done",
    "e\u0301 combining", "中文字符和English混合", "Ελληνικά και русский", "...!!!??", " !x",
    "\r\n\r\nwindows", "a\x1cb\x1fc\x85d", "<|endoftext|> in text", "x<|endoftext|>y",
    "word" * 300, "-" * 500,
]


def test_bpe_matches_library_on_awkward_strings(tok):
    ids, left = native_ids(tok, AWKWARD)
    ref = library_ids(tok, AWKWARD)
    assert left == []  # documents holding a special token's text too: split at it
    for i, (a, b) in enumerate(zip(ids, ref)):
        assert a == b, AWKWARD[i]
    # the public entry point fills those in: every document as the library gives it, + EOS
    got = B.encode_documents(tok, AWKWARD, eos=tok.eos_token_id)
    assert [g.tolist() for g in got] == [r + [tok.eos_token_id] for r in ref]


def test_bpe_matches_library_on_real_text_any_thread_count(tok):
    ref = library_ids(tok, TEXT)
    for threads in (1, 2, 3):
        ids, left = native_ids(tok, TEXT, threads)
        assert left == []
        assert_same_ids(ids, ref, TEXT)


def test_bpe_matches_library_for_every_code_point(tok):
    """Every code point Python's Unicode database assigns, in the contexts that exercise each
    branch of the pre-tokenizer regex (letter/number/other runs, a leading space, whitespace
    runs before a word, contractions)."""
    cls = B.char_classes()
    cps = np.flatnonzero(cls != B.UNSURE)
    contexts = ["a{0}b", "{0}a", "1{0}2", " {0}", "{0} x", "'{0}", "{0}{0}", "\n{0}a", "  {0}",
                "{0}  a", ". {0},"]
    rng = random.Random(0)
    docs = ["".join(rng.choice(contexts).format(chr(c)) for c in cps[i:i + 400])
            for i in range(0, len(cps), 400)]
    ids, left = native_ids(tok, docs)
    assert left == []
    assert_same_ids(ids, library_ids(tok, docs), docs)


def _with_added_tokens(tok, tmp_path, **flags):
    """``tok`` plus added tokens of both kinds (special, not normalized; plain, normalized),
    some prefixes of others, as chat templates' markers are."""
    from tokenizers import AddedToken

    from fastlm.data.tokenizer import load

    tok.save_pretrained(tmp_path / "t")
    out = load(tmp_path / "t")
    out.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, **flags)
        for t in ("<|user|>", "<|assistant|>", "<|im_start|>", "<|im_start|>system")]})
    out.add_tokens([AddedToken(t, normalized=True, **flags) for t in ("[X]", "[X][Y]", "user", "x<|user")])
    return out


def test_bpe_splits_documents_at_added_tokens_as_the_library(tok, tmp_path):
    """Chat-template markers and other added tokens in random places (adjacent, first, last,
    one the prefix of another, one inside a word, one overlapping another) split the text where the library splits it,
    and the text between is encoded natively: the ids are the library's."""
    tok = _with_added_tokens(tok, tmp_path)
    rng = random.Random(0)
    marks = ["<|user|>", "<|assistant|>", "<|im_start|>", "<|im_start|>system", "[X]",
             "[X][Y]", "user", "<|endoftext|>", "<|user", "[X", "\n"]
    words = [w for t in TEXT[:20] for w in t.split(" ")]
    docs = ["".join(rng.choice(marks) if rng.random() < 0.3 else " " + rng.choice(words)
                    for _ in range(rng.randint(1, 60))) for _ in range(300)]
    # the library takes the tokens it does not normalize first: "<|user|>" before "x<|user"
    docs += ["<|user|>", "<|user|><|user|>", "a<|im_start|>systemb", "superuser!", "[X][Y][X]",
             "ax<|user|>b", "ax<|userb"]
    ids, left = native_ids(tok, docs)
    assert left == []
    assert_same_ids(ids, library_ids(tok, docs), docs)


def test_bpe_leaves_added_tokens_that_strip_spaces_to_the_library(tok, tmp_path):
    tok = _with_added_tokens(tok, tmp_path, lstrip=True)
    docs = ["no marker here", "a <|user|> b", "also plain"]
    ids, left = native_ids(tok, docs)
    assert left == [1]
    got = B.encode_documents(tok, docs, eos=None)
    assert [g.tolist() for g in got] == library_ids(tok, docs)


def test_bpe_leaves_unknown_code_points_to_the_library(tok):
    unassigned = chr(0x0378)  # unassigned in every Unicode version so far
    assert B.char_classes()[0x0378] == B.UNSURE
    docs = ["plain", f"has {unassigned} one", "plain again"]
    _, left = native_ids(tok, docs)
    assert left == [1]
    got = B.encode_documents(tok, docs, eos=tok.eos_token_id)
    assert [g.tolist()[:-1] for g in got] == library_ids(tok, docs)


def test_bpe_small_vocab_long_merge_chains(tmp_path, lib):
    tok = train_bpe(TEXT[:40] * 3, 300, tmp_path / "small")  # few merges: long words stay split
    docs = TEXT[40:80] + ["x" * 1000, "ab" * 700]
    ids, left = native_ids(tok, docs)
    assert left == []
    assert_same_ids(ids, library_ids(tok, docs), docs)


def test_bpe_other_tokenizers_use_the_library(tmp_path, lib):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # not GPT-2's rule
    raw.train_from_iterator(TEXT[:50], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    assert B.NativeBpe.for_tokenizer(tok.backend_tokenizer) is None
    got = B.encode_documents(tok, TEXT[:5], eos=tok.eos_token_id)
    assert [g.tolist()[:-1] for g in got] == library_ids(tok, TEXT[:5])


# -- cleaning -------------------------------------------------------------------------------

PALETTE = ([" ", "  ", "\t", "\n", "\n\n\n\n\n", "\r", "\r\n", "\x00", "\x0b", "\x1c", "\x7f",
            "\x85", "\x9f", "\u00a0", "\u2000", "\u2009", "\u200a", "\u200b", "\u3000", "\u2028",
            "\u1680", "é", "e\u0301", "Å", "🙂", "x", "ー"]
           + [f"w{i}" for i in range(12)] + ["spam spam spam", "the same line\n"])


def random_doc(rng: random.Random) -> str:
    return "".join(rng.choice(PALETTE) + rng.choice(["", " ", "\n"])
                   for _ in range(rng.randint(0, 300)))


CONFIGS = [
    C.CleanConfig(),
    C.CleanConfig(min_chars=200, max_chars=700),
    C.CleanConfig(normalize_unicode=False, strip_control=False),
    C.CleanConfig(normalize_whitespace=False),
    C.CleanConfig(strip_control=False),
    C.CleanConfig(repetition=False, near_dedup=False),
    C.CleanConfig(min_words_for_ngrams=5, max_top_ngram_char_frac={3: 0.05, 2: 0.1}, shingle=2,
                  num_perm=17),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_clean_kernels_match_python(cfg, lib):
    rng = random.Random(1)
    docs = [random_doc(rng) for _ in range(150)] + TEXT[:60] + [
        "", "   ", "\n\n", " ".join(["buy cheap pills now"] * 40),
        "a very long repeated line\nx\n" * 2 + "y", "\r\r\n\r", "e\u0301\u0301"]
    texts, reasons, sigs = clean_native.clean_batch(docs, cfg, use_native=True)
    ref_texts, ref_reasons, ref_sigs = clean_native.clean_batch(docs, cfg, use_native=False)
    for i in range(len(docs)):
        assert texts[i] == ref_texts[i], repr(docs[i])
        assert reasons[i] == ref_reasons[i], repr(docs[i])
    assert np.array_equal(sigs, ref_sigs)
    assert sigs.shape == (len(docs), cfg.num_perm if cfg.near_dedup else 0)
    # messages of fine-tuning records: normalised alone, the same either way
    assert clean_native.normalize_batch(docs, cfg, use_native=True) == ref_texts
    assert clean_native.normalize_batch(docs, cfg, use_native=False) == ref_texts
    # the fuzzing reaches every rule
    if cfg == C.CleanConfig():
        assert {"empty", "dup_lines", "dup_line_chars", None} <= set(reasons)
        assert any(r and r.startswith("top_") for r in reasons)


# -- fallback -------------------------------------------------------------------------------


def test_prepare_same_shards_with_and_without_native_kernels(tmp_path, monkeypatch, lib):
    path = tmp_path / "corpus.jsonl"
    rng = random.Random(2)
    with open(path, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": rng.choice(TEXT) + random_doc(rng)}) + "\n")
    fast = prepare([path], tmp_path / "fast", vocab_size=500, progress=False)
    monkeypatch.setenv("FASTLM_TEXT_NATIVE", "0")
    native.load.cache_clear()
    B._LAST[:] = [None, None]
    try:
        assert native.load() is None
        slow = prepare([path], tmp_path / "slow", vocab_size=500, progress=False)
    finally:
        monkeypatch.delenv("FASTLM_TEXT_NATIVE")
        native.load.cache_clear()
        B._LAST[:] = [None, None]
    for name in ("train_00000.bin", "train_00000.idx.npy", "val_00000.bin"):
        assert (fast / name).read_bytes() == (slow / name).read_bytes(), name
    a, b = (json.loads((d / "report.json").read_text()) for d in (fast, slow))
    a.pop("seconds"), b.pop("seconds")
    assert a == b


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_fine_tuning_data_same_with_and_without_native_kernels(tmp_path, monkeypatch,
                                                                     tok, lib):
    """An instruct-style BPE directory (ChatML markers as special tokens, its template): the
    conversations' segments hold the markers, which the C++ encoder now splits off itself (it
    handed every such segment to the library): the shards equal the library's, and the
    encoder took the segments."""
    from fastlm.data.tokenizer import load

    tok.save_pretrained(tmp_path / "chatml")
    chat_tok = load(tmp_path / "chatml")
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat_tok.eos_token = "<|im_end|>"
    chat_tok.chat_template = CHATML
    chat_tok.save_pretrained(tmp_path / "chatml")
    rng = random.Random(3)
    path = tmp_path / "chat.jsonl"
    with open(path, "w") as f:
        for _ in range(40):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": rng.choice(TEXT)[:300]},
                {"role": "assistant", "content": rng.choice(TEXT)[:500]}]}) + "\n")
    calls = []
    real = B.NativeBpe.encode
    monkeypatch.setattr(B.NativeBpe, "encode",
                        lambda self, texts, threads=None: calls.append(real(self, texts, threads))
                        or calls[-1])
    kw = dict(tokenizer=str(tmp_path / "chatml"), sft=True, val_fraction=0.1, progress=False)
    fast = prepare([path], tmp_path / "fast", **kw)
    assert calls and all(left == [] for _, left in calls)  # every segment encoded natively
    monkeypatch.setenv("FASTLM_TEXT_NATIVE", "0")
    native.load.cache_clear()
    B._LAST[:] = [None, None]
    try:
        slow = prepare([path], tmp_path / "slow", **kw)
    finally:
        monkeypatch.delenv("FASTLM_TEXT_NATIVE")
        native.load.cache_clear()
        B._LAST[:] = [None, None]
    for name in ("train_00000.bin", "train_00000.mask.bin", "val_00000.bin", "val_00000.mask.bin"):
        assert (fast / name).read_bytes() == (slow / name).read_bytes(), name


def test_unbuildable_library_warns_once_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="text kernels are unavailable.*no C\\+\\+ compiler"):
            assert native.load() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.load() is None  # remembered: no second warning
            cfg = dataclasses.replace(C.CleanConfig(), num_perm=8)
            texts, reasons, _ = clean_native.clean_batch(["a  b", ""], cfg)
        assert texts == ["a b", ""] and reasons == [None, "empty"]
        with pytest.raises(RuntimeError, match="unavailable"):
            clean_native.clean_batch(["x"], cfg, use_native=True)
    finally:
        native.load.cache_clear()
    assert not list((tmp_path / "cache").glob("text-*/*.so"))


# -- the pre-tokenizer alone (ids can hide a wrong split when no merge crosses it) -------------


def library_pieces(text):
    from tokenizers import pre_tokenizers

    return [off for _, off in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]


@pytest.mark.parametrize("text", AWKWARD + TEXT[:20])
def test_pretokenizer_matches_library(text, lib):
    assert B.pretokenize(text) == library_pieces(text)


def test_pretokenizer_matches_library_for_every_code_point(lib):
    """Each assigned code point in three contexts that tell its class apart (a{c}b joins only
    letters, 1{c}2 only numbers, {c}{c}x splits whitespace as \\s+(?!\\S) does, other
    characters as one run), plus one of several contexts for each regex branch."""
    cls = B.char_classes()
    cps = np.flatnonzero(cls != B.UNSURE)
    contexts = ["a{0}b", "{0}a", "1{0}2", " {0}", "{0} x", "'{0}", "{0}{0}", "\n{0}a", "  {0}",
                "{0}  a", ". {0},", "{0}'s"]
    for c0 in range(0, len(cps), 20000):
        text = "".join("a{0}b1{0}2{0}{0}x".format(chr(c)) + contexts[c % len(contexts)].format(chr(c))
                       for c in cps[c0:c0 + 20000])
        got, ref = B.pretokenize(text), library_pieces(text)
        if got != ref:
            k = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
            raise AssertionError(f"first difference at piece {k}: {text[ref[k][0]:ref[k][1]]!r} "
                                 f"(library) vs {text[got[k][0]:got[k][1]]!r}")


def test_char_class_table_without_a_writable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(blocker / "cache"))  # mkdir under a file fails
    expected = B.char_classes()
    B._char_classes.cache_clear()
    try:
        assert np.array_equal(B.char_classes(), expected)
    finally:
        B._char_classes.cache_clear()
    assert list(tmp_path.iterdir()) == [blocker]


def test_built_library_is_readable_as_a_plain_file(tmp_path, monkeypatch):
    """Compiled into a mkstemp file (0600; the linker adds execute bits: 0711), the library in
    a shared FASTLM_CACHE_DIR could not be loaded by anyone else: it gets a plain file's modes.
    A stand-in compiler writes its output as the linker does."""
    from fastlm._fs import umask

    cxx = tmp_path / "fake-c++"
    cxx.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                   '[ -n "$out" ] && echo lib > "$out" && chmod 711 "$out"; exit 0\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    path = tmp_path / "cache" / "libfastlm_text.so"
    native._build(path)
    assert path.read_text() == "lib\n" and path.stat().st_mode & 0o777 == 0o777 & ~umask()
