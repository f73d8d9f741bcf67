"""Inputs -> a ``datasets.Dataset`` of documents (columns ``text``, ``source``).

Files, globs and directories of ``.txt``, ``.jsonl``/``.json`` and ``.parquet``, text and JSON
compressed as ``.gz``, ``.bz2``, ``.xz`` or ``.zst`` (how corpora are shipped: ``x.jsonl.zst``),
or a dataset saved with ``Dataset.save_to_disk``. Structured files go through ``datasets``
loaders; text files are decoded here so that bytes that are not UTF-8 can be counted (or
reported with the file and byte offset) instead of aborting deep inside a loader.
"""

from __future__ import annotations

import glob
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastlm.data.errors import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
COMPRESSED = {".gz", ".bz2", ".xz", ".zst"}
# what text compresses to, roughly (gzip on English prose: 3-4x; zstd and xz more): only to
# size a tokenizer's sample from file sizes
COMPRESSION_RATIO = 4
_PARAGRAPHS = re.compile(r"\n\s*\n")


@dataclass
class ReadStats:
    files: list = field(default_factory=list)  # (path, size, mtime) of every input
    replaced_chars: int = 0  # bytes that were not UTF-8, replaced by U+FFFD
    empty_files: list = field(default_factory=list)  # JSON/parquet inputs without a record


def kind_suffix(p: Path) -> str:
    """The suffix that says what a file holds: ``.jsonl`` for ``x.jsonl.gz`` as for ``x.jsonl``."""
    return Path(p.stem).suffix if p.suffix in COMPRESSED else p.suffix


def _supported(p: Path) -> bool:
    inner = kind_suffix(p)
    return inner in SUPPORTED and not (p.suffix in COMPRESSED and inner in PARQUET_SUFFIXES)


def open_bytes(path: Path):
    """``path`` opened for reading bytes, decompressed as its suffix says."""
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if path.suffix == ".xz":
        import lzma

        return lzma.open(path, "rb")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst files needs the zstandard package "
                            f"(pip install zstandard), or decompress it first "
                            f"(zstd -d {path})") from None
        return zstandard.open(path, "rb")
    return open(path, "rb")


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and (p / "dataset_info.json").is_file() and (p / "state.json").is_file()


def expand(inputs: list[str]) -> list[Path]:
    """Every input file (sorted within a directory or glob), saved datasets as directories."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"input pattern {item!r} matches no file")
            out += [m for m in matches if m.is_file() and _supported(m)]
        elif _is_saved_dataset(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f))
            if not found:
                raise DataError(f"input directory {p} holds no {sorted(SUPPORTED)} files "
                                f"(text and JSON may be compressed: {sorted(COMPRESSED)})")
            out += found
        elif p.is_file():
            if not _supported(p):
                raise DataError(f"input {p}: unsupported file type {p.suffix!r}; use "
                                f"{sorted(SUPPORTED)} (text and JSON may be compressed: "
                                f"{sorted(COMPRESSED)}) or a saved datasets directory")
            out.append(p)
        else:
            raise DataError(f"input {p} not found (give files, globs, directories or a "
                            f"dataset saved with save_to_disk)")
    if not out:
        raise DataError("no input files")
    return out


def split_text(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text]
    if mode == "lines":
        return [ln for ln in text.split("\n") if ln.strip()]
    if mode == "blank-lines":
        return [d for d in _PARAGRAPHS.split(text) if d.strip()]
    raise DataError(f"--doc-split must be file, blank-lines or lines, got {mode!r}")


def _decode(path: Path, data: bytes, errors: str, stats: ReadStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "strict":
            raise _not_utf8(path, exc.start, data[exc.start:exc.start + 4]) from exc
        text = data.decode("utf-8", errors="replace")
        stats.replaced_chars += text.count("\ufffd") - data.decode(
            "utf-8", errors="ignore").count("\ufffd")
        return text


_CHUNK_BYTES = 1 << 24  # a text file is decoded and split this much at a time


def text_documents(path: Path, mode: str, errors: str, stats: ReadStats):
    """The documents of a text file, read a chunk at a time: the same documents (and count of
    replaced bytes) as ``split_text(_decode(whole file))``, with no more than a chunk and the
    document it is in held at once (``--doc-split file`` reads the file whole)."""
    import codecs

    if mode == "file":
        with open_bytes(path) as f:
            data = _read(f, path)
        yield from split_text(_decode(path, data, errors, stats), mode)
        return
    split_text("", mode)  # an unknown mode fails here, before any reading
    decoder = codecs.getincrementaldecoder("utf-8")("strict" if errors == "strict" else "replace")
    # U+FFFD that the file itself holds are not replaced bytes: what "ignore" decodes holds those
    plain = codecs.getincrementaldecoder("utf-8")("ignore") if errors != "strict" else None
    carry, offset = "", 0
    with open_bytes(path) as f:
        while True:
            data = _read(f, path, _CHUNK_BYTES)
            final = not data
            pending = decoder.getstate()[0]
            try:
                text = decoder.decode(data, final)
            except UnicodeDecodeError as exc:
                # the bytes from the buffer and on (a compressed file cannot seek back cheaply)
                head = (pending + data)[exc.start:exc.start + 4]
                head += _read(f, path, 4 - len(head)) if len(head) < 4 else b""
                raise _not_utf8(path, offset - len(pending) + exc.start, head) from exc
            if plain is not None:
                stats.replaced_chars += text.count("\ufffd") - plain.decode(data, final).count(
                    "\ufffd")
            offset += len(data)
            buf = carry + text
            if final:
                yield from split_text(buf, mode)
                return
            cut = _last_cut(buf, mode)
            yield from split_text(buf[:cut], mode)
            carry = buf[cut:]


def _read(f, path: Path, n: int = -1) -> bytes:
    try:
        return f.read(n)
    except Exception as exc:  # gzip's BadGzipFile and EOFError, lzma's and zstd's own errors
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); the file is damaged "
                        f"or truncated") from exc


def _last_cut(buf: str, mode: str) -> int:
    """Where ``buf`` (text read so far, not yet split) can be cut so that its head splits as the
    whole file would: after its last newline (lines), or after its last paragraph break that
    cannot grow with text still to come (blank lines: a break whose greedy whitespace stops at
    a character that is not whitespace)."""
    if mode == "lines":
        return buf.rfind("\n") + 1
    cut = 0
    for m in _PARAGRAPHS.finditer(buf):
        if m.end() < len(buf) and not buf[m.end()].isspace():
            cut = m.end()
    return cut


def _not_utf8(path: Path, offset: int, head: bytes) -> DataError:
    where = " of the decompressed text" if path.suffix in COMPRESSED else ""
    return DataError(f"{path}: bytes at offset {offset}{where} are not UTF-8 ({head!r}); fix "
                     f"the file or pass --encoding-errors replace to replace and count them")


def load(inputs: list[str], *, text_field: str = "text", doc_split: str = "blank-lines",
         encoding_errors: str = "replace", sft: bool = False, preference: bool = False,
         scratch: Path | None = None):
    """(Dataset, ReadStats). ``sft``: fine-tuning records, read as one column of chat
    messages whatever their layout (see :data:`fastlm.data.chat.FORMATS`); ``preference``:
    preference records, read as ``chosen`` and ``rejected`` conversations."""
    import datasets

    datasets.disable_progress_bars()
    stats = ReadStats()
    parts = []
    for path in expand(inputs):
        st = path.stat()
        stats.files.append({"path": str(path.resolve()), "size": st.st_size,
                            "mtime": st.st_mtime})
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split "
                                    f"(has {list(ds)})")
                ds = ds["train"]
        elif kind_suffix(path) in TEXT_SUFFIXES:
            if sft or preference:
                raise DataError(f"{path}: fine-tuning data must be JSONL, JSON or parquet "
                                f"records of conversations, not plain text")
            docs = text_documents(path, doc_split, encoding_errors, stats)
            parts.append(_text_dataset(docs, str(path), scratch, len(parts)))
            continue
        else:
            kind = "json" if kind_suffix(path) in JSON_SUFFIXES else "parquet"
            if _no_records(path, kind):
                # a shard that came out empty (a filter kept nothing) is part of a corpus, not
                # an error: datasets' loaders fail on it with a StopIteration or a batch size of 0
                stats.empty_files.append(str(path))
                continue
            try:
                # converted to Arrow in the build directory (removed with it), not in the
                # user's datasets cache, which kept a copy of every corpus prepared for good
                ds = datasets.load_dataset(kind, data_files=str(path), split="train",
                                           cache_dir=str(scratch / "hf") if scratch else None)
            except Exception as exc:
                raise DataError(f"{path}: cannot read as {kind} ({_why(path, kind, exc)})") \
                    from exc
        parts.append(_select(ds, path, text_field, sft, preference,
                             cache=scratch / f"records_{len(parts):05d}.arrow" if scratch else None))
    if not parts:
        raise DataError(f"every input is empty ({', '.join(stats.empty_files)}): no records "
                        f"to prepare")
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ds, stats


def _no_records(path: Path, kind: str) -> bool:
    """A JSON file of nothing but whitespace (or an empty array), or a parquet file of no
    rows."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not parquet at all: the loader's error names the problem
            return False
    seen = b""  # what is not whitespace: nothing, or an empty array, is no record
    try:
        with open_bytes(path) as f:
            while chunk := f.read(1 << 20):
                seen += b"".join(chunk.split())
                if len(seen) > 2 or not b"[]".startswith(seen):
                    return False
    except DataError:
        raise
    except Exception:  # damaged: the loader's error (and _why) names the problem
        return False
    return True


def _text_dataset(docs, source: str, scratch: Path | None, n: int):
    """A text file's documents as a Dataset: written to an Arrow file in ``scratch`` as they
    are read and memory-mapped from there (a file's text was held whole, as a string and its
    list of documents), or in memory without a scratch directory."""
    import datasets

    if scratch is None:
        docs = list(docs)
        return datasets.Dataset.from_dict({"text": docs, "source": [source] * len(docs)})
    import pyarrow as pa

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"text_{n:05d}.arrow"
    schema = pa.schema([("text", pa.string()), ("source", pa.string())])
    batch: list[str] = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        def flush():
            writer.write_batch(pa.record_batch([batch, [source] * len(batch)], schema=schema))
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) == 8192:
                flush()
        if batch:
            flush()
    return datasets.Dataset.from_file(str(path))


def _why(path: Path, kind: str, exc: Exception) -> str:
    """What is wrong with the file: for JSON lines the first line that does not parse (datasets
    reports only "An error occurred while generating the dataset"), else the innermost error."""
    if kind == "json":
        import json

        number = 0
        try:
            with io.TextIOWrapper(open_bytes(path), encoding="utf-8") as f:
                for line in f:
                    number += 1
                    if line.strip():
                        json.loads(line)
        except json.JSONDecodeError as bad:
            if kind_suffix(path) == ".jsonl" or number > 1:
                return f"line {number} is not valid JSON: {bad.msg} at column {bad.colno}"
        except Exception as bad:  # not UTF-8, a damaged or truncated compressed file
            return f"{type(bad).__name__}: {bad}"
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    return f"{type(root).__name__}: {str(root)[:300]}"


def _select(ds, path: Path, text_field: str, sft: bool, preference: bool = False,
            cache: Path | None = None):
    """``ds`` as documents, conversations or pairs; fine-tuning records rewritten to ``cache``
    (an Arrow file in the build directory) when given, else in memory (a closure has no stable
    hash for the datasets cache, which would keep a copy for good)."""
    where = {"cache_file_name": str(cache)} if cache else {"keep_in_memory": True}
    if preference:
        from fastlm.data.chat import to_preference

        def pair(row, i):
            chosen, rejected = to_preference(row, f"{path}: record {i}")
            return {"chosen": chosen, "rejected": rejected}

        ds = ds.map(pair, with_indices=True, remove_columns=ds.column_names,
                    load_from_cache_file=False, **where)
    elif sft:  # every layout of conversation becomes one column of messages
        from fastlm.data.chat import detect_format, to_messages

        detect_format(ds.column_names, str(path))
        ds = ds.map(lambda row, i: {"messages": to_messages(row, f"{path}: record {i}")},
                    with_indices=True, remove_columns=ds.column_names,
                    load_from_cache_file=False, **where)
    else:
        if text_field not in ds.column_names:
            raise DataError(f"{path}: no field {text_field!r}; available fields: "
                            f"{ds.column_names} (choose one with --text-field)")
        ds = ds.select_columns([text_field])
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
    return ds.add_column("source", [str(path)] * len(ds))
