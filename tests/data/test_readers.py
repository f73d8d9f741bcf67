"""Text files read a chunk at a time split into the documents the whole file does."""

import numpy as np
import pytest

from fastlm.data import DataError, readers

PIECES = ["word", "mot", "\u00e9t\u00e9", "\u4e2d\u6587", "\U0001f600", " ", "  ", "\t", "\n",
          "\n\n", "\n \n", "\r\n", "\u00a0", "\n\t\n  ", "\ufffd", "x" * 30]
BAD = [b"\xff", b"\xc3", b"\xe4\xb8", b"\xed\xa0\x80"]  # invalid or cut UTF-8


def random_bytes(rng, bad: bool) -> bytes:
    out = []
    for _ in range(int(rng.integers(0, 120))):
        if bad and rng.random() < 0.05:
            out.append(BAD[rng.integers(len(BAD))])
        else:
            out.append(PIECES[rng.integers(len(PIECES))].encode())
    return b"".join(out)


@pytest.mark.parametrize("mode", ["blank-lines", "lines", "file"])
def test_chunked_reading_splits_as_the_whole_file(tmp_path, monkeypatch, mode):
    """Random text (paragraph breaks of every whitespace, multi-byte characters, U+FFFD of its
    own and bytes that are not UTF-8) read 1 to 9 bytes at a time: the documents and the count
    of replaced bytes equal what the whole file, decoded and split at once, gives (chunks cut
    characters, and breaks whose whitespace runs on into the next chunk)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "t.txt"
    for trial in range(150):
        data = random_bytes(rng, bad=trial % 2 == 1)
        path.write_bytes(data)
        whole = readers.ReadStats()
        expected = readers.split_text(readers._decode(path, data, "replace", whole), mode)
        monkeypatch.setattr(readers, "_CHUNK_BYTES", int(rng.integers(1, 10)))
        stats = readers.ReadStats()
        assert list(readers.text_documents(path, mode, "replace", stats)) == expected, data
        assert stats.replaced_chars == whole.replaced_chars


def test_chunked_strict_reading_names_the_first_bad_byte(tmp_path, monkeypatch):
    """The message of the whole file's decoding: its byte offset (14 bytes x 3), the bytes."""
    path = tmp_path / "t.txt"
    path.write_bytes("caf\u00e9\n\nna\u00efve ".encode() * 3 + b"\xc3(" + b" end")
    with pytest.raises(DataError) as whole:
        readers._decode(path, path.read_bytes(), "strict", readers.ReadStats())
    assert "bytes at offset 42 are not UTF-8 (b'\\xc3(" in str(whole.value)
    for chunk in (1, 4, 5, 41, 42, 43, 1 << 20):
        monkeypatch.setattr(readers, "_CHUNK_BYTES", chunk)
        with pytest.raises(DataError) as chunked:
            list(readers.text_documents(path, "blank-lines", "strict", readers.ReadStats()))
        assert str(chunked.value) == str(whole.value)
    with pytest.raises(DataError, match="--doc-split must be"):
        list(readers.text_documents(path, "pages", "strict", readers.ReadStats()))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_text_reads_as_the_plain_file(tmp_path, monkeypatch, suffix):
    """A compressed text file, read a few bytes at a time in every split mode: the documents
    and replaced-byte count of the plain file; a strict read names the byte offset in the
    decompressed text (the reader no longer seeks back in the file for the bad bytes)."""
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    rng = np.random.default_rng(1)
    data = b"".join(random_bytes(rng, bad=True) for _ in range(20))
    plain, packed = tmp_path / "t.txt", tmp_path / f"t.txt{suffix}"
    plain.write_bytes(data)
    with opener(packed, "wb") as f:
        f.write(data)
    assert readers.expand([str(tmp_path)]) == [plain, packed]
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 7)
    for mode in ("blank-lines", "lines", "file"):
        want, got = readers.ReadStats(), readers.ReadStats()
        assert list(readers.text_documents(packed, mode, "replace", got)) == \
            list(readers.text_documents(plain, mode, "replace", want))
        assert got.replaced_chars == want.replaced_chars > 0
    with pytest.raises(DataError) as bad:
        list(readers.text_documents(packed, "lines", "strict", readers.ReadStats()))
    with pytest.raises(DataError) as reference:
        list(readers.text_documents(plain, "lines", "strict", readers.ReadStats()))
    assert str(bad.value) == str(reference.value).replace(
        str(plain), str(packed)).replace(" are not", " of the decompressed text are not")


def test_damaged_or_unsupported_compressed_inputs_are_named(tmp_path, monkeypatch):
    """A truncated gzip (text or JSON lines), .zst without zstandard installed, and a
    compressed parquet file: each an error naming the file and what to do."""
    import gzip
    import sys

    whole = gzip.compress(b"\n".join(b'{"text": "some words %d"}' % i for i in range(2000)))
    for name in ("cut.txt.gz", "cut.jsonl.gz"):
        (tmp_path / name).write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.txt.gz: cannot read \(EOFError.*damaged or trunc"):
        readers.load([str(tmp_path / "cut.txt.gz")])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot read as json \(EOFError"):
        readers.load([str(tmp_path / "cut.jsonl.gz")], scratch=tmp_path / "scratch")
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(DataError, match=r"a.jsonl.zst: reading .zst files needs the zstandard "
                                        r"package \(pip install zstandard\)"):
        readers.load([str(tmp_path / "a.jsonl.zst")])
    (tmp_path / "p.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"p.parquet.gz: unsupported file type '.gz'"):
        readers.expand([str(tmp_path / "p.parquet.gz")])
