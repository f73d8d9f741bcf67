"""``fastlm prepare`` / :func:`prepare`: raw text -> cleaned, deduplicated, tokenized, packed
shards in the format of :mod:`fastlm.data.format`, with a report of what was kept and why.

Steps: read (``readers``) -> normalise + filter (parallel ``datasets.map``) -> exact and near
deduplication (sequential: they compare documents) -> train/validation split by a hash of each
document (independent of order and of the number of processes) -> tokenizer -> tokens + EOS
-> shards. The output is built in a temporary sibling directory and renamed into place.
Documents stream: cleaning (or, for fine-tuning records, rendering) writes them to Arrow files
there, and the later steps read them a batch at a time (memory holds the deduplication index,
not the text).

Cleaning and BPE encoding run fastlm's C++ text kernels (``csrc/text``, see
:mod:`fastlm.data.native`), which give the same results as the Python references and the
`tokenizers` library (tested) several times faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fastlm._fs import shareable
from fastlm.data import clean as C
from fastlm.data import clean_native, native, readers
from fastlm.data import tokenizer as T
from fastlm.data.bpe_native import encode_documents
from fastlm.data.errors import DataError
from fastlm.data.format import FORMAT, SplitWriter


def prepare(inputs, out_dir, *, text_field: str = "text", tokenizer: str = "bpe",
            vocab_size: int = 8192, val_fraction: float = 0.01, clean: C.CleanConfig | None = None,
            doc_split: str = "blank-lines", encoding_errors: str = "replace", sft: bool = False,
            overwrite: bool = False, num_proc: int | None = None, seed: int = 0,
            shard_tokens: int = 1 << 28, split: str = "hash", progress: bool = True,
            chat_template: str = "auto", preference: bool = False,
            **clean_overrides) -> Path:
    """Prepare ``inputs`` into ``out_dir``; returns ``out_dir``. Re-running with unchanged
    inputs and settings reuses the result. Keyword arguments naming :class:`CleanConfig`
    fields (``min_chars=...``, ``near_dedup=False``) override the cleaning config.
    ``chat_template`` (fine-tuning data): ``auto``, ``fastlm`` or a Jinja file, see
    :mod:`fastlm.data.chat`."""
    inputs = [str(i) for i in ([inputs] if isinstance(inputs, str | Path) else inputs)]
    cfg = dataclasses.replace(clean or C.CleanConfig(), **_clean_kwargs(clean_overrides))
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    # before any reading: these failed only after cleaning and deduplication, or meant nothing
    cfg.check()
    if tokenizer == "bpe":
        T.check_bpe_vocab(vocab_size)
    if num_proc is not None and num_proc < 1:
        raise DataError(f"num_proc must be >= 1 (or None: one per core, up to 8), got "
                        f"{num_proc}")
    if split not in ("hash", "tail"):
        raise DataError(f"split must be 'hash' or 'tail', got {split!r}")
    if encoding_errors not in ("replace", "strict"):
        raise DataError(f"encoding_errors must be 'replace' or 'strict', got {encoding_errors!r}")
    out = Path(out_dir)
    settings = {"text_field": text_field, "tokenizer": tokenizer, "vocab_size": vocab_size,
                "val_fraction": val_fraction, "clean": dataclasses.asdict(cfg), "sft": sft,
                "doc_split": doc_split, "encoding_errors": encoding_errors, "seed": seed,
                "shard_tokens": shard_tokens, "split": split}
    chat = None
    if preference:  # pairs of answers to one prompt, for preference tuning (DPO)
        sft = True
        settings["sft"] = True
        settings["preference"] = True  # only when set: earlier data keeps its settings
    if sft:
        from fastlm.data.chat import resolve

        chat = resolve(chat_template, tokenizer)
        settings["chat_template"] = chat.setting()
    settings = json.loads(json.dumps(settings))  # normalise (tuple -> list, int keys -> str)
    files = [_stat(p) for p in readers.expand(inputs)]
    if out.exists():
        if _up_to_date(out, files, settings):
            _say(progress, f"{out} is up to date (same inputs and settings): reusing it")
            return out
        if not overwrite:
            raise DataError(f"output directory {out} exists (from other inputs or settings); "
                            f"pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        meta = _build(inputs, tmp, cfg, settings, files, num_proc, progress, chat)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / "report.json").write_text(json.dumps(meta["report"], indent=1))
        shareable(tmp)  # mkdtemp made it 0700: as mkdir would make it
        if out.exists():
            old = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _print_report(meta["report"], progress)
    return out


def _clean_kwargs(overrides: dict) -> dict:
    names = {f.name for f in dataclasses.fields(C.CleanConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DataError(f"unknown prepare option(s) {unknown}; cleaning options are "
                        f"{sorted(names)}")
    return overrides


def _stat(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def _up_to_date(out: Path, files, settings) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("inputs") == files and meta.get("config") == settings


# -- the pipeline -----------------------------------------------------------------------------


def _build(inputs, tmp: Path, cfg: C.CleanConfig, settings: dict, files, num_proc, progress,
           chat=None):
    sft = settings["sft"]
    preference = settings.get("preference", False)
    clock = _Stopwatch()
    scratch = tmp / ".scratch"  # the documents, on disk; removed before the rename
    try:
        ds, stats = readers.load(inputs, text_field=settings["text_field"],
                                 doc_split=settings["doc_split"],
                                 encoding_errors=settings["encoding_errors"],
                                 sft=sft and not preference, preference=preference,
                                 scratch=scratch)
        report = {"docs_in": len(ds), "chars_in": 0, "dropped": {}, "replaced_chars":
                  stats.replaced_chars, "empty_files": stats.empty_files}
        clock.lap("read")
        if preference:
            docs = _Records.write(_preference_records(ds, cfg, chat, progress), scratch)
        elif sft:
            docs = _Records.write(_sft_records(ds, cfg, chat, progress), scratch)
        else:
            docs = _clean_documents(ds, cfg, num_proc, progress, scratch)
        del ds
        clock.lap("clean")
        flags, lengths = _select(docs, cfg, settings, report, progress)
        clock.lap("dedup")
        # a character vocabulary covers the validation text too (as nanoGPT's does): a
        # character seen only there would otherwise be unknown; BPE learns its merges from
        # train alone
        tok = _tokenizer(settings, docs, flags, lengths, tmp / "tokenizer")
        if chat is not None and tok.chat_template != chat.template:
            # the layout the model is fine-tuned on goes with its tokenizer: into the run, the
            # export, `fastlm generate --chat` and transformers' apply_chat_template
            tok.chat_template = chat.template
            tok.save_pretrained(str(tmp / "tokenizer"))
        clock.lap("tokenizer")
        eos = tok.eos_token_id
        vocab = len(tok)
        dtype = "uint16" if vocab <= 65535 else "uint32"
        writers = {name: SplitWriter(tmp, name, dtype=dtype, masks=sft,
                                     shard_tokens=settings["shard_tokens"])
                   for name in ("train", "val")}
        _write_tokens(tok, docs, flags, writers, eos, sft, preference, progress, clock)
        splits = {name: w.close() for name, w in writers.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["train"] = {"docs": splits["train"]["docs"], "tokens": splits["train"]["tokens"]}
    report["val"] = {"docs": splits["val"]["docs"], "tokens": splits["val"]["tokens"]}
    report["seconds"] = clock.laps
    return {"format": FORMAT, "dtype": dtype, "vocab_size": vocab, "eos_id": eos,
            "tokenizer": "tokenizer", "sft": sft, **({"preference": True} if preference else {}),
            "splits": splits, "report": report,
            "inputs": files, "config": settings}


def _clean_documents(ds, cfg: C.CleanConfig, num_proc, progress, scratch: Path):
    def clean_batch(batch):
        raws = [raw if isinstance(raw, str) else "" for raw in batch["text"]]
        texts, reasons, sigs = clean_native.clean_batch(raws, cfg)
        keys = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
        out = {"text": texts, "reason": [r or "" for r in reasons],
               "chars_in": [len(r) for r in raws], "chars_out": [len(t) for t in texts],
               "key": keys}
        if cfg.near_dedup:  # values < 2^32 (see MinHasher): half the bytes as uint32
            out["sig"] = list(sigs.astype(np.uint32))
        return out

    nproc = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8)
                                                   if len(ds) >= 2000 else None)
    native.load()  # build/load (or warn) once here; forked workers inherit the result
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    scratch.mkdir(parents=True, exist_ok=True)
    # written to Arrow files in the build directory, whatever the input (an in-memory dataset,
    # a .txt file's, gave an in-memory result): the corpus streams through the disk, and the
    # steps below read it a batch at a time
    mapped = ds.map(clean_batch, batched=True, batch_size=256, num_proc=nproc,
                    remove_columns=ds.column_names, load_from_cache_file=False,
                    cache_file_name=str(scratch / "clean.arrow"),
                    desc="cleaning" if progress else None)
    # datasets sets TOKENIZERS_PARALLELISM=false for its workers and "restores" os.environ by
    # rebinding a copy, which leaves the real environment at false: tokenization would then
    # run on one thread (2.3x slower here). Restore it for real.
    if before is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        os.unsetenv("TOKENIZERS_PARALLELISM")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return _Documents(mapped.data.table, cfg.num_perm if cfg.near_dedup else 0)


class _Documents:
    """The cleaned documents in input order, in memory-mapped Arrow files. Read a batch at a
    time, whole columns at once (indexing a Dataset row by row costs ~0.3 ms a row)."""

    def __init__(self, table, num_perm: int):
        self.table, self.num_perm, self.n = table, num_perm, table.num_rows

    def meta(self, batch: int):
        """(reasons, keys, chars_in, chars_out, signatures or None) a batch at a time."""
        cols = ["reason", "key", "chars_in", "chars_out"] + (["sig"] if self.num_perm else [])
        for rb in self.table.select(cols).to_batches(max_chunksize=batch):
            sigs = None
            if self.num_perm:
                flat = rb.column("sig").flatten().to_numpy(zero_copy_only=False)
                sigs = flat.reshape(rb.num_rows, self.num_perm)
            yield (rb.column("reason").to_pylist(), rb.column("key").to_pylist(),
                   rb.column("chars_in").to_pylist(), rb.column("chars_out").to_pylist(), sigs)

    def rows(self, start: int, stop: int) -> list[dict]:
        return [{"text": t} for t in self.table.column("text").slice(start, stop - start)
                .to_pylist()]

    def texts(self, index: np.ndarray) -> list[str]:
        """The texts at ``index`` (ascending), taken chunk by chunk: Arrow's take on the
        whole column concatenated its chunks first, the corpus's text in memory at once."""
        import pyarrow as pa

        out, base, k = [], 0, 0
        for chunk in self.table.column("text").chunks:
            end = int(np.searchsorted(index, base + len(chunk)))
            if end > k:
                out += chunk.take(pa.array(index[k:end] - base)).to_pylist()
            k, base = end, base + len(chunk)
        return out


class _Records(_Documents):
    """Fine-tuning records (conversations rendered, or pairs) in an Arrow file of the build
    directory, with their ``segments`` (text, trained) and a pair's ``rejected`` ones: a
    million conversations were a few GB of Python objects when they were held in a list."""

    _BATCH = 1024  # records rendered, then written, at a time

    @classmethod
    def write(cls, records, scratch: Path) -> _Records:
        import pyarrow as pa

        seg = pa.list_(pa.struct([("text", pa.string()), ("trained", pa.uint8())]))
        schema = pa.schema([("text", pa.string()), ("reason", pa.string()),
                            ("key", pa.string()), ("chars_in", pa.int64()),
                            ("chars_out", pa.int64()), ("segments", seg), ("rejected", seg)])
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / "records.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as out:
            batch: list[dict] = []

            def flush():
                out.write_batch(pa.RecordBatch.from_pylist(
                    [{"text": r["text"], "reason": "", "key": r["key"],
                      "chars_in": r["chars_in"], "chars_out": len(r["text"]),
                      "segments": _as_structs(r["segments"]),
                      "rejected": _as_structs(r.get("rejected"))} for r in batch], schema))
                batch.clear()

            for r in records:
                batch.append(r)
                if len(batch) == cls._BATCH:
                    flush()
            if batch:
                flush()
        # memory-mapped: read back a batch at a time by the steps that follow
        return cls(pa.ipc.open_stream(pa.memory_map(str(path))).read_all(), num_perm=0)

    def rows(self, start: int, stop: int) -> list[dict]:
        part = self.table.slice(start, stop - start).select(["text", "segments", "rejected"])
        return [{"text": r["text"], "segments": _as_tuples(r["segments"]),
                 "rejected": _as_tuples(r["rejected"])} for r in part.to_pylist()]


def _as_structs(segments):
    return None if segments is None else [{"text": t, "trained": m} for t, m in segments]


def _as_tuples(structs):
    return None if structs is None else [(s["text"], s["trained"]) for s in structs]


def _sft_records(ds, cfg: C.CleanConfig, chat, progress):
    """Conversations (the readers give every layout as messages) -> records whose text is the
    conversation as the chat template renders it and whose ``segments`` say which parts are
    trained on."""
    split = 0
    rows = _normalized_rows(ds, ("messages",), cfg, progress, "rendering conversations")
    for n, row in enumerate(rows):
        examples = chat.examples(row["messages"], f"fine-tuning record {n} ({row['source']})")
        split += len(examples) > 1
        for segments in examples:
            text = "".join(s for s, _ in segments)
            yield {"text": text, "segments": segments, "chars_in": len(text),
                   "key": hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}
    if split:
        logging.getLogger("fastlm").warning(
            "the chat template (%s) renders earlier turns otherwise once later ones follow, so "
            "%d multi-turn record(s) were split into one example per assistant turn (earlier "
            "turns as untrained context; more tokens than one example each)", chat.source, split)


def _preference_records(ds, cfg: C.CleanConfig, chat, progress):
    """Pairs -> records of the chosen conversation (``text``, ``segments``: its last answer
    alone trained) and the rejected one's segments; the pair is one record, so deduplication
    and the split keep its two answers together."""
    rows = _normalized_rows(ds, ("chosen", "rejected"), cfg, progress,
                            "rendering preference pairs")
    for n, row in enumerate(rows):
        where = f"preference record {n} ({row['source']})"
        pair = [chat.final_answer(row[k], where) for k in ("chosen", "rejected")]
        if pair[0] == pair[1]:
            raise DataError(f"{where}: the chosen and rejected answers are the same")
        text = "".join(t for t, _ in pair[0])
        other = "".join(t for t, _ in pair[1])
        yield {"text": text, "segments": pair[0], "rejected": pair[1],
               "chars_in": len(text) + len(other),
               "key": hashlib.blake2b((text + "\0" + other).encode(), digest_size=16).hexdigest()}


def _normalized_rows(ds, columns: tuple[str, ...], cfg: C.CleanConfig, progress, desc: str,
                     batch: int = 512):
    """``ds``'s rows ({column: messages, "source"}) with every message's content normalised,
    a batch of rows at a time (one call of the C++ kernel for all their messages, and
    columns read a batch at a time: 40% of rendering went to normalising a message at a
    time in Python, and to reading rows one by one)."""
    bar = _bar(len(ds), progress, desc)
    for b in ds.iter(batch_size=batch):
        rows = range(len(b["source"]))
        contents = clean_native.normalize_batch(  # in the order they are read back below
            [m["content"] for i in rows for col in columns for m in b[col][i]], cfg)
        k = 0
        for i in rows:
            row = {"source": b["source"][i]}
            for col in columns:
                row[col] = []
                for m in b[col][i]:
                    row[col].append({"role": m["role"], "content": contents[k]})
                    k += 1
            yield row
        if bar is not None:
            bar.update(len(b["source"]))
    if bar is not None:
        bar.close()


_SELECT_BATCH = 8192  # documents' keys and signatures read at a time
_TOKENIZE_BATCH = 4096  # documents' text read, tokenized and written at a time


def _select(docs, cfg: C.CleanConfig, settings: dict, report, progress):
    """Exact and near deduplication (in input order: the first of each kept) and the split:
    (flags, lengths), a byte (-1 dropped, 0 train, 1 validation) and the cleaned length of
    each document. Memory holds the deduplication's index (see :class:`NearDedup`), not the
    text."""
    flags = np.full(docs.n, -1, dtype=np.int8)
    lengths = np.zeros(docs.n, dtype=np.int64)
    by_hash = settings["split"] != "tail"
    u = np.ones(docs.n) if by_hash else None  # each kept document's hash in [0, 1)
    seed = settings["seed"]
    seen: set[int] = set()
    near = C.NearDedup(cfg) if cfg.near_dedup else None
    bar = _bar(docs.n, progress, "deduplicating")
    i = 0
    for reasons, keys, chars_in, chars_out, sigs in docs.meta(_SELECT_BATCH):
        for j, key in enumerate(keys):
            report["chars_in"] += chars_in[j]
            if reasons[j]:
                _drop(report, reasons[j], chars_in[j])
                continue
            if cfg.dedup:
                k = int(key, 16)
                if k in seen:
                    _drop(report, "exact_duplicate", chars_in[j])
                    continue
                seen.add(k)
            if sigs is not None and near.is_duplicate(key, sigs[j]):
                _drop(report, "near_duplicate", chars_in[j])
                continue
            flags[i + j] = 0
            lengths[i + j] = chars_out[j]
            if by_hash:  # the same document lands in the same split whatever the order, the
                # other documents or the number of processes
                h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
                u[i + j] = int.from_bytes(h, "little") / 2**64
        i += len(keys)
        if bar is not None:
            bar.update(len(keys))
    if bar is not None:
        bar.close()
    kept = np.flatnonzero(flags >= 0)
    report["docs_out"] = len(kept)
    report["chars_out"] = int(lengths.sum())
    if not len(kept):
        raise DataError("cleaning removed every document: " + _dropped_summary(report) +
                        "; relax the filters (e.g. --min-chars, --no-repetition) or check the "
                        "input and --text-field")
    frac = settings["val_fraction"]
    if not by_hash:  # the last documents in input order (nanoGPT's convention)
        val = np.zeros(len(kept), dtype=bool)
        val[len(kept) - int(round(len(kept) * frac)):] = True
    else:
        val = u[kept] < frac
        if frac > 0 and not val.any() and len(kept) > 1:
            val[np.argmin(u[kept])] = True  # a validation split of one document
    if val.all():
        raise DataError("no training documents left after the validation split; lower "
                        "--val-fraction")
    flags[kept[val]] = 1
    return flags, lengths


TOKENIZER_SAMPLE_CHARS = 4_000_000  # BPE is trained on up to this much of the train split


def _tokenizer(settings, docs, flags: np.ndarray, lengths: np.ndarray, path: Path):
    kind = settings["tokenizer"]
    if kind == "byte":
        return T.byte_level(path)
    if kind == "char":  # every kept document, train and validation, a batch at a time
        kept = np.flatnonzero(flags >= 0)
        b = _TOKENIZE_BATCH
        return T.char_level((t for start in range(0, len(kept), b)
                             for t in docs.texts(kept[start:start + b])), path)
    if kind == "bpe":
        # Merges converge on a few MB of text; training on all of a large corpus would cost
        # more than everything else here. Every k-th document, so the sample spans all inputs.
        train = np.flatnonzero(flags == 0)
        total = int(lengths[train].sum())
        stride = max(1, -(-total // TOKENIZER_SAMPLE_CHARS))
        return T.train_bpe(docs.texts(train[::stride]), settings["vocab_size"], path)
    return T.copy_pretrained(kind, path)


def _write_tokens(tok, docs, flags, writers, eos: int, sft: bool, preference: bool, progress,
                  clock) -> None:
    """Tokenize the kept documents a batch at a time, in input order, into each split's
    shards: no more than a batch of text and tokens is in memory."""
    batch = _TOKENIZE_BATCH
    bar = _bar(docs.n, progress, "tokenizing")
    for start in range(0, docs.n, batch):
        f = flags[start:start + batch]
        if (f >= 0).any():
            rows = docs.rows(start, start + batch)
            for code, name in ((0, "train"), (1, "val")):
                chosen = [rows[j] for j in np.flatnonzero(f == code).tolist()]
                if not chosen:
                    continue
                if preference:  # each pair as two documents, chosen then rejected
                    chosen = [d for r in chosen for d in ({"segments": r["segments"]},
                                                          {"segments": r["rejected"]})]
                tokens, masks = _tokenize(tok, chosen, eos, sft)
                clock.lap("tokenize")
                for k, t in enumerate(tokens):
                    writers[name].add(t, masks[k] if masks is not None else None)
                clock.lap("write")
        if bar is not None:
            bar.update(len(f))
    if bar is not None:
        bar.close()


def _tokenize(tok, docs, eos: int, sft: bool):
    tokens, masks = [], ([] if sft else None)
    if _is_byte_tokenizer(tok) and not sft:
        return _tokenize_bytes(docs, eos), None
    for chunk in _by_chars(docs, _ENCODE_CHARS):
        if not sft:
            # fastlm's C++ BPE encoder where it reproduces this tokenizer, else the library
            tokens += encode_documents(tok, [r["text"] for r in chunk], eos)
            continue
        # every segment of the chunk in one batch, each encoded on its own (as the model
        # will see a prompt end and a response start); the chat template ends each response
        # (EOS or its end-of-turn marker), so nothing is appended
        parts = iter(encode_documents(tok, [t for r in chunk for t, _ in r["segments"]], None))
        for r in chunk:
            ids, mask = [], []
            for _text, flag in r["segments"]:
                piece = next(parts)
                ids.append(piece)
                mask.append(np.full(len(piece), flag, dtype=np.uint8))
            tokens.append(np.concatenate(ids))
            masks.append(np.concatenate(mask))
    return tokens, masks


_ENCODE_CHARS = 1 << 21  # characters handed to the tokenizer at a time


def _by_chars(docs: list[dict], limit: int):
    """``docs`` in runs of about ``limit`` characters (at least one document each): the
    tokenizer library's result objects for a batch of 4096 long conversations held ~600 MB."""
    start, size = 0, 0
    for i, r in enumerate(docs):
        size += len(r["text"]) if "text" in r else sum(len(t) for t, _ in r["segments"])
        if size >= limit:
            yield docs[start:i + 1]
            start, size = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def _is_byte_tokenizer(tok) -> bool:
    """Is ``tok`` fastlm's byte-level tokenizer (257 ids, EOS last)?"""
    return len(tok) == 257 and tok.eos_token_id == 256


def _tokenize_bytes(docs, eos: int) -> list[np.ndarray]:
    """Byte tokenization as a table lookup: the ids the byte-level tokenizer would give
    (asserted in tests), 50x faster than running it."""
    from fastlm.data.tokenizer import byte_ids_table

    table = byte_ids_table()
    out = []
    for r in docs:
        b = np.frombuffer(r["text"].encode(), dtype=np.uint8)
        out.append(np.append(table[b], eos))
    return out


class _Stopwatch:
    def __init__(self):
        import time

        self._time = time.perf_counter
        self._t = self._time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._time()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self._t, 4)
        self._t = now


# -- reporting --------------------------------------------------------------------------------


def _drop(report, reason: str, chars: int) -> None:
    d = report["dropped"].setdefault(reason, {"docs": 0, "chars": 0})
    d["docs"] += 1
    d["chars"] += chars


def _dropped_summary(report) -> str:
    parts = [f"{k}: {v['docs']} docs" for k, v in sorted(report["dropped"].items())]
    return f"{report['docs_in']} documents in; dropped " + (", ".join(parts) or "none")


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=0.5)


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg)


def _print_report(report, enabled: bool) -> None:
    if not enabled:
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fastlm prepare: cleaning report")
    t.add_column("")
    t.add_column("documents", justify="right")
    t.add_column("characters", justify="right")
    t.add_row("in", f"{report['docs_in']:,}", f"{report['chars_in']:,}")
    for reason, d in sorted(report["dropped"].items()):
        t.add_row(f"dropped: {reason}", f"{d['docs']:,}", f"{d['chars']:,}")
    t.add_row("out", f"{report['docs_out']:,}", f"{report['chars_out']:,}")
    for split in ("train", "val"):
        t.add_row(f"{split} (tokens)", f"{report[split]['docs']:,}",
                  f"{report[split]['tokens']:,} tok")
    if report.get("replaced_chars"):
        t.add_row("non-UTF-8 bytes replaced", "", f"{report['replaced_chars']:,}")
    if report.get("empty_files"):
        n = len(report["empty_files"])
        t.add_row("empty files skipped", f"{n:,} file{'s' * (n > 1)}", "")
    Console().print(t)
