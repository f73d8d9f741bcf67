"""``fastlm prepare INPUT... --out DIR``: see :func:`fastlm.data.prepare`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastlm.cli import at_least, probability

    parser.add_argument("inputs", nargs="+", help=".txt/.jsonl/.json/.parquet files (text and "
                        "JSON may be .gz/.bz2/.xz/.zst), globs, directories, a dataset saved "
                        "with save_to_disk, or builtin:pydoc")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--text-field", default="text", help="field of structured records")
    parser.add_argument("--tokenizer", default="bpe",
                        help="'bpe' (train byte-level BPE), 'byte', 'char' (one token per "
                             "character of the corpus, as nanoGPT's char-level data), or a local "
                             "HF tokenizer dir")
    parser.add_argument("--vocab-size", type=at_least(1), default=8192,
                        help="for --tokenizer bpe")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents for validation (by document hash)")
    parser.add_argument("--split", default="hash", choices=["hash", "tail"],
                        help="validation documents: by a seeded hash (default), or the last "
                        "ones in input order")
    parser.add_argument("--doc-split", default="blank-lines",
                        choices=["blank-lines", "lines", "file"],
                        help="how .txt files divide into documents")
    parser.add_argument("--encoding-errors", default="replace", choices=["replace", "strict"],
                        help="bytes that are not UTF-8: replace and count, or stop")
    parser.add_argument("--preference", action="store_true",
                        help="preference pairs for DPO (train.objective=dpo): records with "
                        "'prompt' + 'chosen' + 'rejected' (strings or messages), or 'chosen' "
                        "and 'rejected' whole conversations; laid out as --sft is")
    parser.add_argument("--sft", action="store_true", help="fine-tuning data: prompt/response "
                        "(or messages) records; loss only on responses")
    parser.add_argument("--chat-template", default="auto", metavar="auto|fastlm|FILE",
                        help="with --sft: how conversations are laid out; auto = the "
                        "tokenizer's own chat template if it has one, else fastlm's; saved "
                        "with the tokenizer for generation and the export")
    parser.add_argument("--min-chars", type=at_least(0), default=1)
    parser.add_argument("--max-chars", type=at_least(1), default=None)
    parser.add_argument("--no-repetition", action="store_true", help="skip the Gopher "
                        "repetition filters")
    parser.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    parser.add_argument("--no-near-dedup", action="store_true", help="keep near duplicates")
    parser.add_argument("--near-dedup-threshold", type=probability, default=0.8,
                        help="estimated Jaccard similarity, in (0, 1]")
    parser.add_argument("--num-proc", type=at_least(1), default=None, help="cleaning processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    from pathlib import Path

    from fastlm.data.pipeline import prepare
    from fastlm.data.sources import resolve_inputs

    inputs = resolve_inputs(args.inputs, Path(args.out).resolve().parent / "sources")
    out = prepare(
        inputs, args.out, text_field=args.text_field, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, val_fraction=args.val_fraction, doc_split=args.doc_split,
        split=args.split,
        encoding_errors=args.encoding_errors, sft=args.sft, preference=args.preference, overwrite=args.overwrite,
        chat_template=args.chat_template,
        num_proc=args.num_proc, seed=args.seed, min_chars=args.min_chars,
        max_chars=args.max_chars, repetition=not args.no_repetition, dedup=not args.no_dedup,
        near_dedup=not args.no_near_dedup, near_dedup_threshold=args.near_dedup_threshold)
    print(f"prepared {out} (meta.json, report.json, tokenizer/, shards)")
    return 0
