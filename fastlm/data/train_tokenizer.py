"""``fastlm tokenizer INPUT... --out DIR``: one tokenizer trained on several corpora.

``fastlm prepare --tokenizer bpe`` trains its BPE on the corpus it prepares; the sources of a
data mixture (``data.mix``) must share one tokenizer, and a tokenizer trained on the first
source alone encodes the others poorly (code with an English vocabulary). This command trains
it on a sample of every source at once, the sample drawn as ``prepare`` draws its own (every
k-th document, the text normalised as cleaning normalises it), and writes the tokenizer
directory that each source's ``fastlm prepare --tokenizer DIR`` then uses.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from fastlm.data.errors import DataError

_BATCH = 1024  # documents read and normalised at a time


def train_tokenizer(inputs: list[str], out: str | Path, *, kind: str = "bpe",
                    vocab_size: int = 8192, text_field: str = "text",
                    doc_split: str = "blank-lines", sample_chars: int | None = None,
                    overwrite: bool = False) -> tuple[Path, dict]:
    """(the tokenizer directory, what it was trained on). ``kind``: ``bpe`` (byte-level, on a
    sample of about ``sample_chars`` characters spread over every input in proportion to its
    size) or ``char`` (every character of every document, as nanoGPT's vocabulary)."""
    from fastlm.data import clean as C
    from fastlm.data import clean_native, readers
    from fastlm.data import tokenizer as T
    from fastlm.data.pipeline import TOKENIZER_SAMPLE_CHARS

    if kind not in ("bpe", "char"):
        raise DataError(f"--kind must be bpe or char, got {kind!r} (byte needs no training)")
    if kind == "bpe":
        T.check_bpe_vocab(vocab_size)
    if sample_chars is not None and sample_chars < 1:
        raise DataError(f"--sample-mb must be > 0, got {sample_chars / 1e6:g}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    files = readers.expand(inputs)
    size = sum(f.stat().st_size * (readers.COMPRESSION_RATIO if f.suffix in readers.COMPRESSED
                                   else 1)
               for p in files for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    sample = TOKENIZER_SAMPLE_CHARS if sample_chars is None else sample_chars
    stride = 1 if kind == "char" else max(1, -(-size // sample))  # bytes ~ characters
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = C.CleanConfig()
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out.parent) as tmp:
        ds, _ = readers.load(inputs, text_field=text_field, doc_split=doc_split,
                             scratch=Path(tmp) / "scratch")
        picked = ds.select(range(0, len(ds), stride)).select_columns(["text"])
        seen = {"documents": len(picked), "of_documents": len(ds), "chars": 0}

        def texts():
            for batch in picked.iter(batch_size=_BATCH):
                for text in clean_native.normalize_batch(
                        [t if isinstance(t, str) else "" for t in batch["text"]], cfg):
                    seen["chars"] += len(text)
                    yield text

        build = Path(tmp) / "tokenizer"
        if kind == "bpe":
            tok = T.train_bpe(texts(), vocab_size, build)
        else:
            tok = T.char_level(texts(), build)
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)  # whole or not at all
    return out, {**seen, "inputs": len(files), "vocab_size": len(tok)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastlm.cli import at_least, positive

    parser.add_argument("inputs", nargs="+", help="the corpora, as fastlm prepare takes them "
                        "(files, globs, directories, saved datasets, builtin:pydoc)")
    parser.add_argument("--out", required=True, help="the tokenizer directory to write")
    parser.add_argument("--kind", default="bpe", choices=["bpe", "char"])
    parser.add_argument("--vocab-size", type=at_least(1), default=8192, help="for --kind bpe")
    parser.add_argument("--text-field", default="text", help="field of structured records")
    parser.add_argument("--doc-split", default="blank-lines",
                        choices=["blank-lines", "lines", "file"],
                        help="how .txt files divide into documents")
    parser.add_argument("--sample-mb", type=positive, default=None,
                        help="BPE's sample of text, spread over every input in proportion to "
                             "its size (default: 4, what fastlm prepare trains on)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from fastlm.data.sources import resolve_inputs

    out = Path(args.out)
    inputs = resolve_inputs(args.inputs, out.resolve().parent / "sources")
    sample = None if args.sample_mb is None else int(args.sample_mb * 1e6)
    path, seen = train_tokenizer(inputs, out, kind=args.kind, vocab_size=args.vocab_size,
                                 text_field=args.text_field, doc_split=args.doc_split,
                                 sample_chars=sample, overwrite=args.overwrite)
    print(f"trained a {args.kind} tokenizer of {seen['vocab_size']:,} tokens on "
          f"{seen['chars']:,} characters ({seen['documents']:,} of {seen['of_documents']:,} "
          f"documents, {seen['inputs']} input file{'s' * (seen['inputs'] != 1)}) -> {path}\n"
          f"use it for every source of a mixture: fastlm prepare INPUT --tokenizer {path} "
          f"--out DIR")
    return 0
