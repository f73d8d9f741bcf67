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
