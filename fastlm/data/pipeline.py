"""``fastlm prepare`` / :func:`prepare`: raw text -> cleaned, deduplicated, tokenized, packed
shards in the format of :mod:`fastlm.data.format`, with a report of what was kept and why.

Steps: read (``readers``) -> normalise + filter (parallel ``datasets.map``) -> exact and near
deduplication (sequential: they compare documents) -> train/validation split by a hash of each
document (independent of order and of the number of processes) -> tokenizer -> tokens + EOS
-> shards. The output is built in a temporary sibling directory and renamed into place.

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

from fastlm.data import clean as C
from fastlm.data import clean_native, native, readers
from fastlm.data.bpe_native import encode_documents
from fastlm.data.errors import DataError
from fastlm.data.format import FORMAT, write_split


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
    ds, stats = readers.load(inputs, text_field=settings["text_field"],
                             doc_split=settings["doc_split"],
                             encoding_errors=settings["encoding_errors"],
                             sft=sft and not preference, preference=preference)
    report = {"docs_in": len(ds), "chars_in": 0, "dropped": {}, "replaced_chars":
              stats.replaced_chars}
    clock.lap("read")
    if preference:
        records = _preference_records(ds, cfg, chat, progress)
    elif sft:
        records = _sft_records(ds, cfg, chat, progress)
    else:
        records = _clean_documents(ds, cfg, num_proc, report, progress)
    clock.lap("clean")
    kept = _deduplicate(records, cfg, report, progress)
    clock.lap("dedup")
    report["docs_out"] = len(kept)
    report["chars_out"] = sum(len(r["text"]) for r in kept)
    if not kept:
        raise DataError("cleaning removed every document: " + _dropped_summary(report) +
                        "; relax the filters (e.g. --min-chars, --no-repetition) or check the "
                        "input and --text-field")
    if settings["split"] == "tail":  # the last documents in input order (nanoGPT's convention)
        n_val = int(round(len(kept) * settings["val_fraction"]))
        train, val = kept[:len(kept) - n_val], kept[len(kept) - n_val:]
    else:
        train, val = _split(kept, settings["val_fraction"], settings["seed"])
    # a character vocabulary covers the validation text too (as nanoGPT's does): a character
    # seen only there would otherwise be unknown; BPE learns its merges from train alone
    vocab_docs = kept if settings["tokenizer"] == "char" else train
    tok = _tokenizer(settings, [r["text"] for r in vocab_docs], tmp / "tokenizer")
    if chat is not None and tok.chat_template != chat.template:
        # the layout the model is fine-tuned on goes with its tokenizer: into the run, the
        # export, `fastlm generate --chat` and transformers' apply_chat_template
        tok.chat_template = chat.template
        tok.save_pretrained(str(tmp / "tokenizer"))
    clock.lap("tokenizer")
    eos = tok.eos_token_id
    vocab = len(tok)
    dtype = "uint16" if vocab <= 65535 else "uint32"
    splits = {}
    for name, docs in (("train", train), ("val", val)):
        if preference:  # each pair as two documents, chosen then rejected
            docs = [d for r in docs for d in ({"segments": r["segments"]},
                                              {"segments": r["rejected"]})]
        tokens, masks = _tokenize(tok, docs, eos, sft, progress, name)
        clock.lap("tokenize")
        splits[name] = write_split(tmp, name, tokens, dtype=dtype, masks=masks,
                                   shard_tokens=settings["shard_tokens"])
        clock.lap("write")
    report["train"] = {"docs": splits["train"]["docs"], "tokens": splits["train"]["tokens"]}
    report["val"] = {"docs": splits["val"]["docs"], "tokens": splits["val"]["tokens"]}
    report["seconds"] = clock.laps
    return {"format": FORMAT, "dtype": dtype, "vocab_size": vocab, "eos_id": eos,
            "tokenizer": "tokenizer", "sft": sft, **({"preference": True} if preference else {}),
            "splits": splits, "report": report,
            "inputs": files, "config": settings}


def _clean_documents(ds, cfg: C.CleanConfig, num_proc, report, progress):
    def clean_batch(batch):
        raws = [raw if isinstance(raw, str) else "" for raw in batch["text"]]
        texts, reasons, sigs = clean_native.clean_batch(raws, cfg)
        keys = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts]
        return {"text": texts, "reason": [r or "" for r in reasons],
                "chars_in": [len(r) for r in raws], "sig": list(sigs), "key": keys}

    nproc = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8)
                                                   if len(ds) >= 2000 else None)
    native.load()  # build/load (or warn) once here; forked workers inherit the result
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    mapped = ds.map(clean_batch, batched=True, batch_size=256, num_proc=nproc,
                    desc="cleaning" if progress else None)
    # datasets sets TOKENIZERS_PARALLELISM=false for its workers and "restores" os.environ by
    # rebinding a copy, which leaves the real environment at false: tokenization would then
    # run on one thread (2.3x slower here). Restore it for real.
    if before is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        os.unsetenv("TOKENIZERS_PARALLELISM")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    # whole Arrow columns at once: indexing a Dataset row by row costs ~0.3 ms a row
    col = lambda name: mapped.data.column(name)  # noqa: E731
    reasons, texts, keys = (col(c).to_pylist() for c in ("reason", "text", "key"))
    chars = col("chars_in").to_pylist()
    sigs = None
    if cfg.near_dedup:
        flat = col("sig").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        sigs = flat.astype(np.uint64).reshape(len(reasons), cfg.num_perm)
    report["chars_in"] = int(sum(chars))
    records = []
    for i, reason in enumerate(reasons):
        if reason:
            _drop(report, reason, chars[i])
        else:
            records.append({"text": texts[i], "key": keys[i], "chars_in": chars[i],
                            "sig": sigs[i] if sigs is not None else None})
    return records


def _sft_records(ds, cfg: C.CleanConfig, chat, progress):
    """Conversations (the readers give every layout as messages) -> records whose text is the
    conversation as the chat template renders it and whose ``segments`` say which parts are
    trained on."""
    records, split = [], 0
    for n, row in enumerate(_progress(ds, progress, "rendering conversations")):
        messages = [{"role": m["role"], "content": C.normalize(m["content"], cfg)}
                    for m in row["messages"]]
        examples = chat.examples(messages, f"fine-tuning record {n} ({row['source']})")
        split += len(examples) > 1
        for segments in examples:
            text = "".join(s for s, _ in segments)
            records.append({"text": text, "segments": segments, "chars_in": len(text),
                            "sig": None,
                            "key": hashlib.blake2b(text.encode(), digest_size=16).hexdigest()})
    if split:
        logging.getLogger("fastlm").warning(
            "the chat template (%s) renders earlier turns otherwise once later ones follow, so "
            "%d multi-turn record(s) were split into one example per assistant turn (earlier "
            "turns as untrained context; more tokens than one example each)", chat.source, split)
    return records


def _preference_records(ds, cfg: C.CleanConfig, chat, progress):
    """Pairs -> records of the chosen conversation (``text``, ``segments``: its last answer
    alone trained) and the rejected one's segments; the pair is one record, so deduplication
    and the split keep its two answers together."""
    records = []
    for n, row in enumerate(_progress(ds, progress, "rendering preference pairs")):
        where = f"preference record {n} ({row['source']})"
        pair = [chat.final_answer([{"role": m["role"], "content": C.normalize(m["content"], cfg)}
                                   for m in row[k]], where) for k in ("chosen", "rejected")]
        if pair[0] == pair[1]:
            raise DataError(f"{where}: the chosen and rejected answers are the same")
        text = "".join(t for t, _ in pair[0])
        other = "".join(t for t, _ in pair[1])
        records.append({"text": text, "segments": pair[0], "rejected": pair[1],
                        "chars_in": len(text) + len(other), "sig": None,
                        "key": hashlib.blake2b((text + "\0" + other).encode(),
                                               digest_size=16).hexdigest()})
    return records


def _deduplicate(records, cfg: C.CleanConfig, report, progress):
    kept, seen = [], set()
    near = C.NearDedup(cfg) if cfg.near_dedup else None
    for r in _progress(records, progress, "deduplicating"):
        if cfg.dedup and r["key"] in seen:
            _drop(report, "exact_duplicate", r["chars_in"])
            continue
        seen.add(r["key"])
        if near is not None and r["sig"] is not None and near.is_duplicate(
                r["key"], np.asarray(r["sig"], dtype=np.uint64)):
            _drop(report, "near_duplicate", r["chars_in"])
            continue
        kept.append(r)
    return kept


def _split(records, val_fraction: float, seed: int):
    """By a seeded hash of each document: the same document always lands in the same split,
    whatever the order, the other documents or the number of processes."""
    def u(r):
        h = hashlib.blake2b(f"{seed}:{r['key']}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2**64

    scored = [(u(r), r) for r in records]
    val = [r for x, r in scored if x < val_fraction]
    train = [r for x, r in scored if x >= val_fraction]
    if val_fraction > 0 and not val and len(train) > 1:
        first = min(range(len(scored)), key=lambda i: scored[i][0])
        val = [scored[first][1]]
        train = [r for i, (_, r) in enumerate(scored) if i != first]
    if not train:
        raise DataError("no training documents left after the validation split; lower "
                        "--val-fraction")
    return train, val


TOKENIZER_SAMPLE_CHARS = 4_000_000  # BPE is trained on up to this much of the train split


def _tokenizer(settings, train_texts, path: Path):
    from fastlm.data import tokenizer as T

    kind = settings["tokenizer"]
    if kind == "byte":
        return T.byte_level(path)
    if kind == "char":
        return T.char_level(train_texts, path)
    if kind == "bpe":
        # Merges converge on a few MB of text; training on all of a large corpus would cost
        # more than everything else here. Every k-th document, so the sample spans all inputs.
        total = sum(len(t) for t in train_texts)
        stride = max(1, -(-total // TOKENIZER_SAMPLE_CHARS))
        return T.train_bpe(train_texts[::stride], settings["vocab_size"], path)
    return T.copy_pretrained(kind, path)


def _tokenize(tok, docs, eos: int, sft: bool, progress: bool, name: str):
    tokens, masks = [], ([] if sft else None)
    if _is_byte_tokenizer(tok) and not sft:
        return _tokenize_bytes(docs, eos), None
    batch = 4096
    for start in _progress(range(0, len(docs), batch), progress, f"tokenizing {name}"):
        chunk = docs[start:start + batch]
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


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False, mininterval=0.5)


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
    Console().print(t)
