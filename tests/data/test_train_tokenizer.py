"""`fastlm tokenizer`: one BPE trained on a sample of several corpora, for a data mixture."""

import json
from pydoc_data.topics import topics

import pytest

from fastlm.cli import main
from fastlm.data import DataError, prepare
from fastlm.data import tokenizer as T
from fastlm.data.train_tokenizer import train_tokenizer
from fastlm.train.generate import load_tokenizer

ENGLISH = list(topics.values())[:40]
CODE = ["".join(f"def handler_{i}_{j}(request_payload):\n    return dispatch_table["
                f"request_payload]({i * j})\n" for j in range(20)) for i in range(60)]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "en.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ENGLISH))
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    return tmp_path / "en.jsonl", tmp_path / "code.jsonl"


def test_a_tokenizer_of_every_source_encodes_each_of_them(tmp_path, sources):
    """Trained on both sources, the BPE encodes the code in far fewer tokens than the one
    `fastlm prepare` trains on the English source alone (what a mixture had to use), and the
    English about as well; prepare takes the directory as its tokenizer."""
    en, code = sources
    both, seen = train_tokenizer([str(en), str(code)], tmp_path / "tok", vocab_size=600)
    assert seen["documents"] == seen["of_documents"] == len(ENGLISH) + len(CODE)
    alone = prepare([en], tmp_path / "en_data", tokenizer="bpe", vocab_size=600,
                    val_fraction=0.0, progress=False) / "tokenizer"
    joint, english = load_tokenizer(both), load_tokenizer(alone)

    def count(tok, texts):
        return sum(len(tok(t).input_ids) for t in texts)

    ratio = count(joint, CODE) / count(english, CODE)
    assert ratio < 0.6, ratio  # 0.55 here
    assert count(joint, ENGLISH) < 1.2 * count(english, ENGLISH)
    out = prepare([code], tmp_path / "code_data", tokenizer=str(both), val_fraction=0.0,
                  progress=False)
    assert len(load_tokenizer(out / "tokenizer")) == len(joint) == 600


def test_the_sample_is_every_kth_document_normalised(tmp_path, sources):
    """A sample smaller than the corpus: every k-th document (k from the inputs' size), the
    text normalised as cleaning does: the BPE trained on exactly those."""
    from fastlm.data import clean as C

    en, code = sources
    docs = ENGLISH + CODE
    size = en.stat().st_size + code.stat().st_size
    path, seen = train_tokenizer([str(en), str(code)], tmp_path / "tok", vocab_size=400,
                                 sample_chars=size // 5)
    stride = -(-size // (size // 5))
    picked = [C.normalize(t, C.CleanConfig()) for t in docs[::stride]]
    assert seen["documents"] == len(picked) < len(docs) and seen["chars"] == sum(map(len, picked))
    ref = T.train_bpe(picked, 400, tmp_path / "ref")
    assert json.loads((path / "tokenizer.json").read_text())["model"] == \
        json.loads((tmp_path / "ref" / "tokenizer.json").read_text())["model"]
    assert len(load_tokenizer(path)) == len(ref)


def test_command_line_and_its_errors(tmp_path, sources, capsys):
    en, code = sources
    out = tmp_path / "tok"
    assert main(["tokenizer", str(en), str(code), "--vocab-size", "300", "--out", str(out)]) == 0
    assert f"fastlm prepare INPUT --tokenizer {out}" in capsys.readouterr().out
    with pytest.raises(DataError, match="exists: pass --overwrite"):
        train_tokenizer([str(en)], out)
    assert main(["tokenizer", str(en), "--kind", "char", "--out", str(out), "--overwrite"]) == 0
    chars = set("".join(ENGLISH))
    assert len(load_tokenizer(out)) == len(chars) + 2  # + EOS and unknown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.jsonl", "en.jsonl", "tok"]
