"""`fastlm prepare` end to end on corpora the tests write, and on tiny shakespeare."""

import json
from pathlib import Path

import numpy as np
import pytest

from fastlm.cli import main
from fastlm.data import DataError, prepare
from fastlm.data.format import open_split
from fastlm.data.tokenizer import byte_ids_table
from fastlm.train.generate import load_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def doc(i: int, words: int = 80) -> str:
    rng = np.random.default_rng(i)
    vocab = [f"w{j}" for j in range(500)]
    return " ".join(rng.choice(vocab, words))


@pytest.fixture
def corpus(tmp_path):
    docs = [doc(i) for i in range(40)]
    planted = {
        "exact": docs[3],  # an exact copy
        "near": docs[5].replace("w1 ", "w2 ", 1) + " extra",  # a near copy
        "short": "tiny",
        "spam": " ".join(["click here now"] * 60),
    }
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i, d in enumerate(docs + list(planted.values())):
            f.write(json.dumps({"body": d, "id": i}) + "\n")
    return path, docs


def read_docs(out, split):
    s = open_split(out, split)
    docs = []
    for sh in s.shards:
        toks = np.asarray(sh.tokens)
        docs += [toks[a:b].tolist() for a, b in zip(sh.doc_starts[:-1], sh.doc_starts[1:])]
    return docs


def test_pipeline_cleans_dedups_and_packs(tmp_path, corpus):
    path, docs = corpus
    out = prepare([path], tmp_path / "out", text_field="body", tokenizer="bpe", vocab_size=400,
                  val_fraction=0.2, min_chars=10, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    rep = meta["report"]
    assert rep["docs_in"] == 44
    assert rep["dropped"]["exact_duplicate"]["docs"] == 1
    assert rep["dropped"]["near_duplicate"]["docs"] == 1
    assert rep["dropped"]["too_short"]["docs"] == 1
    assert sum(v["docs"] for k, v in rep["dropped"].items() if k.startswith("top_")) == 1
    assert rep["docs_out"] == 40 == rep["train"]["docs"] + rep["val"]["docs"]
    assert json.loads((out / "report.json").read_text()) == rep
    # shards hold exactly the kept documents, tokenized, each followed by EOS
    tok = load_tokenizer(out)
    eos = tok.eos_token_id
    got = read_docs(out, "train") + read_docs(out, "val")
    assert all(d[-1] == eos and eos not in d[:-1] for d in got)
    texts = sorted(tok.decode(d[:-1]) for d in got)
    assert texts == sorted(docs)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) <= 400


def test_split_is_deterministic_and_order_independent(tmp_path, corpus):
    path, _ = corpus
    lines = path.read_text().splitlines()
    rev = tmp_path / "rev.jsonl"
    rev.write_text("\n".join(reversed(lines)) + "\n")
    kw = dict(text_field="body", tokenizer="byte", val_fraction=0.3, progress=False)
    a = prepare([path], tmp_path / "a", **kw)
    b = prepare([rev], tmp_path / "b", **kw)
    tok = load_tokenizer(a)
    va = sorted(tok.decode(d[:-1]) for d in read_docs(a, "val"))
    vb = sorted(tok.decode(d[:-1]) for d in read_docs(b, "val"))
    assert va == vb and 0 < len(va) < 40


def test_byte_table_matches_the_byte_tokenizer(tmp_path):
    from fastlm.data.tokenizer import byte_level

    tok = byte_level(tmp_path / "t")
    text = "Héllo, wörld! \n\t{}~ 日本 \x01"
    table = byte_ids_table()
    fast = table[np.frombuffer(text.encode(), dtype=np.uint8)].tolist()
    assert fast == tok(text, add_special_tokens=False).input_ids
    assert tok.decode(fast) == text


def test_sft_masks_prompts(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i}+{i}?", "response": f"It is {2 * i}."} for i in range(20)]
    rows.append({"messages": None, "prompt": "Hi", "response": "Hello."})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.1,
                  progress=False)
    tok = load_tokenizer(out)
    split = open_split(out, "train")
    sh = split.shards[0]
    toks, mask = np.asarray(sh.tokens), np.asarray(sh.mask)
    a, b = sh.doc_starts[0], sh.doc_starts[1]
    text = tok.decode(toks[a:b][:-1])
    trained = tok.decode(toks[a:b][mask[a:b] == 1][:-1])
    assert text.startswith("<|user|>\nWhat is") and "<|assistant|>\nIt is" in text
    assert trained.startswith("It is") and trained.endswith(".")
    assert mask[b - 1] == 1 and toks[b - 1] == tok.eos_token_id
    report = json.loads((out / "report.json").read_text())  # the conversations as laid out
    assert report["chars_in"] == report["chars_out"] > 0  # (chars_in was 0)


def test_chat_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    path.write_text("\n".join(json.dumps({"messages": msgs, "n": i}) for i in range(3)) + "\n")
    out = prepare([path], tmp_path / "o", tokenizer="byte", sft=True, val_fraction=0.0,
                  dedup=False, progress=False)
    sh = open_split(out, "train").shards[0]
    tok = load_tokenizer(out)
    toks, mask = np.asarray(sh.tokens), np.asarray(sh.mask)
    assert tok.decode(toks[mask == 1]).count("Hello.") == 3


def test_txt_doc_split_and_saved_dataset_and_parquet(tmp_path, monkeypatch):
    """Text, parquet and a saved dataset together, and nothing left in the datasets cache: the
    loaders convert each file to Arrow in the build directory, removed with it (the user's
    cache kept a copy of every corpus prepared)."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(doc(1) + "\n\n" + doc(2) + "\n\n\n" + doc(3))
    pq = tmp_path / "in" / "b.parquet"
    datasets.Dataset.from_dict({"text": [doc(4), doc(5)]}).to_parquet(str(pq))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [doc(6)]}).save_to_disk(str(saved))
    out = prepare([tmp_path / "in", saved], tmp_path / "o", tokenizer="byte",
                  val_fraction=0.0, progress=False)
    assert json.loads((out / "meta.json").read_text())["report"]["docs_in"] == 6
    assert not cache.exists() or not any(cache.rglob("*.arrow"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o", "saved"]


def test_bad_inputs(tmp_path, corpus):
    path, _ = corpus
    with pytest.raises(DataError, match="not found"):
        prepare([tmp_path / "missing.txt"], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"no field 'text'; available fields: \['body', 'id'\]"):
        prepare([path], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"removed every document: 44 documents in; dropped "
                                        r".*too_short: 44 docs"):
        prepare([path], tmp_path / "o", text_field="body", min_chars=10**6, progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text here\n\nbad \xff\xfe bytes " + doc(9).encode())
    with pytest.raises(DataError, match=r"bad.txt: bytes at offset 20 are not UTF-8"):
        prepare([bad], tmp_path / "o", encoding_errors="strict", progress=False)
    out = prepare([bad], tmp_path / "o", tokenizer="byte", val_fraction=0.0, progress=False)
    assert json.loads((out / "meta.json").read_text())["report"]["replaced_chars"] == 2
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # nothing left over


@pytest.mark.parametrize("kw, match", [
    # refused before any reading: the vocabulary was checked after cleaning and dedup, the
    # others meant nothing (a threshold of 2 removed no near copy)
    (dict(vocab_size=100), r"--vocab-size 100 is too small for byte-level BPE"),
    (dict(near_dedup_threshold=2.0), r"near_dedup_threshold is a Jaccard similarity in \(0, 1\]"),
    (dict(min_chars=10, max_chars=5), r"max_chars \(if set\) >= min_chars"),
    (dict(num_proc=0), r"num_proc must be >= 1"),
])
def test_meaningless_settings_are_refused_before_reading(tmp_path, monkeypatch, kw, match):
    from fastlm.data import readers

    monkeypatch.setattr(readers, "load", lambda *a, **k: pytest.fail("read the inputs"))
    (tmp_path / "a.txt").write_text(doc(1))
    with pytest.raises(DataError, match=match):
        prepare([tmp_path / "a.txt"], tmp_path / "o", progress=False, **kw)


def test_corrupt_structured_files_name_what_is_wrong(tmp_path):
    """datasets says only "An error occurred while generating the dataset": the error names the
    JSON line that does not parse, or the reader's own reason (a corrupt parquet file)."""
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "a fine document"}\n\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: cannot read as json \(line 3 is not valid "
                                        r"JSON: Expecting value at column 10\)"):
        prepare([lines], tmp_path / "o", progress=False)
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: cannot read as parquet \(\w+: .*parquet"):
        prepare([parquet], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_empty_structured_files_are_skipped_and_counted(tmp_path):
    """A corpus shard with no records (an empty JSONL file, a parquet file of no rows) adds
    nothing and is counted in the report; datasets' loaders raised StopIteration or "BatchSize
    must be greater than 0" on them. Nothing but empty files is an error naming them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    full = tmp_path / "in" / "a.jsonl"
    full.write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(20)))
    (tmp_path / "in" / "b.jsonl").write_text("\n  \n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "in" / "c.parquet")
    (tmp_path / "in" / "d.json").write_text(" [\n ] ")  # "Instruction 'train' ... no data"
    kw = dict(tokenizer="byte", val_fraction=0.0, dedup=False, progress=False)
    out = prepare([tmp_path / "in"], tmp_path / "o", **kw)
    report = json.loads((out / "meta.json").read_text())["report"]
    alone = prepare([full], tmp_path / "o2", **kw)
    assert report["docs_out"] == 20
    assert [Path(p).name for p in report["empty_files"]] == ["b.jsonl", "c.parquet", "d.json"]
    assert (out / "train_00000.bin").read_bytes() == (alone / "train_00000.bin").read_bytes()
    with pytest.raises(DataError, match=r"every input is empty \(.*b.jsonl, .*c.parquet\)"):
        prepare([tmp_path / "in" / "b.jsonl", tmp_path / "in" / "c.parquet"], tmp_path / "o3",
                **kw)
    assert not (tmp_path / "o3").exists()


def test_compressed_corpus_prepares_as_the_plain_one(tmp_path):
    """Text and JSON as corpora ship them (gzip, bzip2, xz): the same shards as the files
    decompressed; they were refused as "unsupported file type '.gz'"."""
    import bz2
    import gzip
    import lzma

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    files = {"a.txt": "\n\n".join(doc(i) for i in range(30)),
             "b.jsonl": "".join(json.dumps({"text": doc(i)}) + "\n" for i in range(30, 60)),
             "c.json": json.dumps([{"text": doc(i)} for i in range(60, 90)])}
    for (name, text), (suffix, opener) in zip(files.items(), [(".gz", gzip.open),
                                                              (".bz2", bz2.open),
                                                              (".xz", lzma.open)]):
        (plain / name).write_text(text)
        with opener(packed / (name + suffix), "wt") as f:
            f.write(text)
    kw = dict(tokenizer="byte", progress=False)
    a = prepare([plain], tmp_path / "o1", **kw)
    b = prepare([packed], tmp_path / "o2", **kw)
    # built in a mkdtemp directory (0700): renamed into place with a plain directory's modes
    from fastlm._fs import umask

    assert {oct(p.stat().st_mode & 0o777) for p in [a, *a.rglob("*")] if p.is_dir()} == \
        {oct(0o777 & ~umask())}
    report = json.loads((b / "meta.json").read_text())["report"]
    assert report["docs_in"] == 90 and report["empty_files"] == []
    for split in ("train", "val"):
        assert (a / f"{split}_00000.bin").read_bytes() == (b / f"{split}_00000.bin").read_bytes()


def test_existing_output_is_reused_or_refused(tmp_path, corpus, capsys):
    path, _ = corpus
    kw = dict(text_field="body", tokenizer="byte", progress=True)
    out = prepare([path], tmp_path / "o", **kw)
    stamp = (out / "meta.json").stat().st_mtime_ns
    prepare([path], tmp_path / "o", **kw)
    assert "up to date" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="exists.*--overwrite"):
        prepare([path], tmp_path / "o", **dict(kw, val_fraction=0.5))
    prepare([path], tmp_path / "o", overwrite=True, **dict(kw, val_fraction=0.5))
    assert json.loads((out / "meta.json").read_text())["config"]["val_fraction"] == 0.5


def test_cli(tmp_path, corpus, capsys):
    path, _ = corpus
    rc = main(["prepare", str(path), "--out", str(tmp_path / "o"), "--text-field", "body",
               "--tokenizer", "byte", "--no-near-dedup"])
    assert rc == 0 and (tmp_path / "o" / "meta.json").is_file()
    assert "dropped: exact_duplicate" in capsys.readouterr().out
    rc = main(["prepare", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p")])
    assert rc == 2 and "not found" in capsys.readouterr().err


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/tinyshakespeare.txt absent")
def test_tinyshakespeare_byte_level(tmp_path):
    out = prepare([SHAKESPEARE], tmp_path / "s", tokenizer="byte", val_fraction=0.1,
                  progress=False)
    meta = json.loads((out / "meta.json").read_text())
    rep = meta["report"]
    assert rep["docs_in"] > 7000 and rep["train"]["tokens"] > 900_000
    assert 0.05 < rep["val"]["tokens"] / (rep["train"]["tokens"] + rep["val"]["tokens"]) < 0.15
    text = SHAKESPEARE.read_text()
    tok = load_tokenizer(out)
    first = read_docs(out, "train")[0]
    assert tok.decode(first[:-1]) in text


def test_tail_split_takes_the_last_documents(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(doc(i) for i in range(10)))
    out = prepare([path], tmp_path / "o", tokenizer="byte", val_fraction=0.2, split="tail",
                  progress=False)
    tok = load_tokenizer(out)
    assert [tok.decode(d[:-1]) for d in read_docs(out, "val")] == [doc(8), doc(9)]


def test_sft_with_bpe_tokenizes_each_segment_as_the_library_does(tmp_path):
    """Prompt and response are tokenized separately (fastlm's C++ encoder); the shard holds
    exactly the library's ids of each segment, the mask 1 on the response and the EOS."""
    USER, ASSISTANT = "<|user|>\n", "<|assistant|>\n"  # fastlm's chat template

    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Question {i}: what's {doc(i, 6)}?", "response": f"Answer {i}: {doc(i + 50, 9)}."}
            for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = prepare([path], tmp_path / "o", tokenizer="bpe", vocab_size=300, sft=True,
                  val_fraction=0.0, progress=False)
    tok = load_tokenizer(out)
    sh = open_split(out, "train").shards[0]
    toks, mask = np.asarray(sh.tokens), np.asarray(sh.mask)
    lib = tok.backend_tokenizer
    seen = 0
    for a, b in zip(sh.doc_starts[:-1], sh.doc_starts[1:]):
        text = tok.decode(toks[a:b][:-1])
        row = next(r for r in rows if r["response"] in text)
        prompt = lib.encode(USER + row["prompt"] + "\n" + ASSISTANT, add_special_tokens=False).ids
        response = lib.encode(row["response"], add_special_tokens=False).ids
        assert toks[a:b].tolist() == prompt + response + [tok.eos_token_id]
        assert mask[a:b].tolist() == [0] * len(prompt) + [1] * (len(response) + 1)
        seen += 1
    assert seen == 30


def test_char_tokenizer_one_id_per_character(tmp_path):
    """--tokenizer char: the vocabulary is the corpus's characters (validation's included, in
    code-point order), EOS and an unknown token; each character is one id and decoding gives
    the text back exactly (newlines, punctuation, non-ASCII beyond the BMP)."""
    texts = ["First Citizen:\nBefore we proceed, hear me speak.", "Zoë — naïve café 😀",
             "ALL:\nSpeak, speak."]
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(texts))
    out = prepare([path], tmp_path / "o", tokenizer="char", val_fraction=0.34, split="tail",
                  min_chars=1, repetition=False, progress=False)
    tok = load_tokenizer(out)
    chars = sorted(set("".join(texts)))
    assert len(tok) == len(chars) + 2 and tok.convert_ids_to_tokens(list(range(3))) == chars[:3]
    assert tok.eos_token_id == len(chars) and tok.unk_token_id == len(chars) + 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == len(chars) + 2
    docs = read_docs(out, "train") + read_docs(out, "val")
    assert [tok.decode(d[:-1]) for d in docs] == texts  # "😀" only in validation: still known
    assert all(len(d) == len(t) + 1 and d[-1] == tok.eos_token_id for d, t in zip(docs, texts))
    assert tok.encode("Q!")[0] == tok.unk_token_id  # a character the corpus never had
    assert main(["prepare", str(path), "--out", str(tmp_path / "cli"), "--tokenizer", "char",
                 "--min-chars", "1", "--no-repetition"]) == 0


@pytest.mark.parametrize("tokenizer", ["bpe", "char", "byte"])
def test_batches_of_any_size_write_the_same_data(tmp_path, corpus, monkeypatch, tokenizer):
    """The corpus streams through the pipeline a batch at a time (its text is never whole in
    memory): batches of 3 and 5 documents, splitting the corpus and each split anywhere, write
    what one batch does, byte for byte; and the cleaned text is read in no larger pieces."""
    from fastlm.data import pipeline

    path, _ = corpus

    def run(name):
        out = prepare([path], tmp_path / name, text_field="body", tokenizer=tokenizer,
                      vocab_size=400, val_fraction=0.2, min_chars=10, progress=False)
        return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.is_file()
                and f.name != "report.json"}, json.loads((out / "report.json").read_text())

    whole, report = run("whole")
    reads = []
    rows, texts = pipeline._Documents.rows, pipeline._Documents.texts
    monkeypatch.setattr(pipeline._Documents, "rows",
                        lambda self, a, b: reads.append(b - a) or rows(self, a, b))
    monkeypatch.setattr(pipeline._Documents, "texts",
                        lambda self, idx: reads.append(len(idx)) or texts(self, idx))
    monkeypatch.setattr(pipeline, "_SELECT_BATCH", 5)
    monkeypatch.setattr(pipeline, "_TOKENIZE_BATCH", 3)
    batched, batched_report = run("batched")
    meta = json.loads(batched["meta.json"])
    assert meta["splits"]["train"]["docs"] > 0 and meta["splits"]["val"]["docs"] > 0
    # BPE trains on a sample of the documents, read at once (a few MB at most)
    assert reads and max(reads[1:] if tokenizer == "bpe" else reads) <= 3
    whole.pop("meta.json"), batched.pop("meta.json")
    assert batched == whole
    for r in (report, batched_report):
        r.pop("seconds")
    assert batched_report == report
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nor a scratch left


def test_shards_stream_to_disk_as_documents_arrive(tmp_path):
    """SplitWriter (what prepare writes with) = write_split: a shard closes before the
    document that would not fit, documents never span shards, masks follow their tokens."""
    from fastlm.data.format import SplitWriter, write_split

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, int(n)).tolist() for n in rng.integers(1, 40, 50)]
    masks = [rng.integers(0, 2, len(d)).tolist() for d in docs]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    entry = write_split(tmp_path / "a", "train", docs, masks=masks, shard_tokens=64)
    writer = SplitWriter(tmp_path / "b", "train", masks=True, shard_tokens=64)
    for d, m in zip(docs, masks):
        writer.add(d, m)
    assert writer.close() == entry and len(entry["shards"]) > 5
    for f in (tmp_path / "a").iterdir():
        assert (tmp_path / "b" / f.name).read_bytes() == f.read_bytes()
    meta = {"format": "fastlm-tokens-v1", "dtype": "uint16", "vocab_size": 300, "eos_id": 0,
            "splits": {"train": entry}}
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    split = open_split(tmp_path / "a", "train")
    got, got_masks = [], []
    for sh in split.shards:
        assert len(sh.tokens) <= 64 or sh.doc_starts.tolist() == [0, len(sh.tokens)]
        got += [np.asarray(sh.tokens[a:b]).tolist() for a, b in zip(sh.doc_starts[:-1],
                                                                   sh.doc_starts[1:])]
        got_masks += [np.asarray(sh.mask[a:b]).tolist() for a, b in zip(sh.doc_starts[:-1],
                                                                       sh.doc_starts[1:])]
    assert got == docs and got_masks == masks


def test_cleaned_documents_are_read_chunk_by_chunk():
    """_Documents.texts takes each chunk's rows from that chunk (Arrow's take on the whole
    column had concatenated the chunks: the corpus's text in memory, ~1 GB for a 1 GB corpus,
    when BPE took its sample); any ascending rows, across chunk boundaries."""
    import pyarrow as pa

    from fastlm.data.pipeline import _Documents

    texts = [f"document {i}" for i in range(50)]
    sizes = [7, 1, 13, 9, 20]
    batches, at = [], 0
    for n in sizes:
        batches.append(pa.record_batch({"text": texts[at:at + n]}))
        at += n
    docs = _Documents(pa.Table.from_batches(batches), 0)
    assert docs.table.column("text").num_chunks == len(sizes)
    rng = np.random.default_rng(0)
    for _ in range(20):
        index = np.sort(rng.choice(50, int(rng.integers(0, 50)), replace=False))
        assert docs.texts(index) == [texts[i] for i in index]
    assert docs.texts(np.arange(50)) == texts and docs.rows(5, 9) == [{"text": t} for t in
                                                                     texts[5:9]]
