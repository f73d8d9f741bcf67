"""``fastlm bench data``: MB/s of raw text through the whole ``fastlm prepare`` pipeline
(read, clean, filter, exact + near dedup, BPE training, tokenization, shard writing).

The corpus is synthesised from text on every machine (Python's pydoc topics, plus tiny
shakespeare when ../shared/data has it): documents of 10-30 random paragraphs, so there are
many documents of web-page size, all distinct, with realistic word statistics.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser) -> None:
    from fastlm.cli import at_least, positive

    parser.add_argument("--input", default=None, help="a text file to draw paragraphs from "
                        "(default: pydoc topics + tinyshakespeare if found)")
    parser.add_argument("--mb", type=positive, default=16.0, help="corpus size in MB")
    parser.add_argument("--tokenizer", default="bpe", help="bpe, byte or a tokenizer dir")
    parser.add_argument("--vocab-size", type=at_least(1), default=8192)
    parser.add_argument("--num-proc", type=at_least(1), default=None)
    parser.add_argument("--out", default=None, help="directory for JSON and markdown")
    parser.add_argument("--name", default="data_cpu")
    parser.add_argument("--sft", action="store_true", help="conversations instead of documents "
                        "(fastlm prepare --sft): a question and its answer of paragraphs each")


def paragraphs(source: str | None) -> list[str]:
    texts = []
    if source:
        texts.append(Path(source).read_text(errors="replace"))
    else:
        from pydoc_data.topics import topics

        texts += list(topics.values())
        shakes = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare.txt"
        if shakes.is_file():
            texts.append(shakes.read_text())
    paras = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40]
    return paras


def synth_corpus(path: Path, mb: float, source: str | None, seed: int = 0,
                 sft: bool = False) -> int:
    rng = random.Random(seed)
    paras = paragraphs(source)
    size, n = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(10, 30)))
            if sft:  # the first paragraph asks, the others answer
                ask, answer = doc.split("\n\n", 1)
                record = {"messages": [{"role": "user", "content": ask},
                                       {"role": "assistant", "content": answer}]}
            else:
                record = {"text": doc}
            line = json.dumps(record) + "\n"
            f.write(line)
            size += len(doc.encode())
            n += 1
    return n


def run(args) -> int:
    from fastlm.bench import harness
    from fastlm.data import prepare

    tmp = Path(tempfile.mkdtemp(prefix="fastlm-bench-data-"))
    try:
        corpus = tmp / "corpus.jsonl"
        n_docs = synth_corpus(corpus, args.mb, args.input, sft=args.sft)
        with open(corpus) as f:
            raw_mb = sum(len(_text(json.loads(x)).encode()) for x in f) / 1e6
        import datasets  # noqa: F401  (imports are not pipeline time)
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401

        t0 = time.perf_counter()
        # the main process's peak (the cleaning workers are processes of their own, each
        # holding a batch): the corpus streams, so this is the deduplication index's size
        peak_gb = harness.cpu_peak_gb(lambda: prepare(
            [str(corpus)], tmp / "out", tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            num_proc=args.num_proc, sft=args.sft, progress=False))
        seconds = time.perf_counter() - t0
        meta = json.loads((tmp / "out" / "meta.json").read_text())
        kernels = _kernel_comparison(corpus, tmp / "out" / "tokenizer", args.tokenizer == "bpe")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = harness.Report(name=args.name, command="fastlm bench data " + shlex.join(
        sys.argv[3:]) if sys.argv[1:3] == ["bench", "data"] else shlex.join(sys.argv),
        device="cpu", env=harness.environment("cpu"))
    rep = meta["report"]
    report.add(docs=n_docs, raw_mb=round(raw_mb, 2), tokenizer=args.tokenizer, sft=args.sft,
               cpus=os.cpu_count(), seconds=round(seconds, 2), mb_per_s=raw_mb / seconds,
               docs_out=rep["docs_out"], tokens=rep["train"]["tokens"] + rep["val"]["tokens"],
               dropped=sum(d["docs"] for d in rep["dropped"].values()),
               peak_gb=round(peak_gb, 3) if peak_gb is not None else None)
    for stage, sec in rep["seconds"].items():
        report.rows[0][f"s_{stage}"] = sec
    report.summary.update(kernels)
    print(harness.format_table(report.rows))
    print("kernels side by side: " + ", ".join(f"{k} = {v:.3g}" for k, v in kernels.items()))
    if args.out:
        paths = report.write(args.out)
        paths.append(_plot(rep["seconds"], raw_mb, Path(args.out) / f"{args.name}.png",
                           f"fastlm prepare{' --sft' * args.sft}, {raw_mb:.0f} MB, "
                           f"tokenizer {args.tokenizer}: "
                           f"{raw_mb / seconds:.2f} MB/s", kernels))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _text(record: dict) -> str:
    """A document's text, or a conversation's messages one after another."""
    if "messages" in record:
        return "\n\n".join(m["content"] for m in record["messages"])
    return record["text"]


def _kernel_comparison(corpus: Path, tokenizer_dir: Path, bpe: bool, sample_mb: float = 8.0,
                       repeats: int = 3) -> dict:
    """MB/s of fastlm's C++ text kernels and of what they replace, on the same documents (up
    to ``sample_mb`` of the corpus), best of ``repeats``: cleaning (one process) against the
    Python reference, BPE encoding against the tokenizers library (both on every core)."""
    from fastlm.data import bpe_native, clean_native
    from fastlm.data.clean import CleanConfig
    from fastlm.data.tokenizer import load

    docs, size = [], 0
    with open(corpus) as f:
        for line in f:
            docs.append(_text(json.loads(line)))
            size += len(docs[-1].encode())
            if size >= sample_mb * 1e6:
                break
    mb = size / 1e6

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return mb / min(times)

    cfg = CleanConfig()
    out = {"kernel_sample_mb": round(mb, 2),
           "clean_mb_s_fastlm": best(lambda: clean_native.clean_batch(docs, cfg, use_native=True)),
           "clean_mb_s_python": best(lambda: clean_native.clean_batch(docs, cfg, use_native=False))}
    out["clean_speedup"] = out["clean_mb_s_fastlm"] / out["clean_mb_s_python"]
    if bpe:
        tok = load(tokenizer_dir)
        enc = bpe_native.NativeBpe.for_tokenizer(tok.backend_tokenizer)
        lib = tok.backend_tokenizer
        out["bpe_mb_s_fastlm"] = best(lambda: enc.encode(docs))
        out["bpe_mb_s_tokenizers"] = best(lambda: lib.encode_batch_fast(docs, add_special_tokens=False))
        out["bpe_speedup"] = out["bpe_mb_s_fastlm"] / out["bpe_mb_s_tokenizers"]
    return out


def _plot(stages: dict, mb: float, path: Path, title: str, kernels: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = kernels or {}
    pairs = [(name, kernels[f"{name}_mb_s_fastlm"], peer, kernels[f"{name}_mb_s_{peer}"])
             for name, peer in (("clean", "python"), ("bpe", "tokenizers"))
             if f"{name}_mb_s_fastlm" in kernels]
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(10 if pairs else 6, 3), squeeze=False)
    ax = axes[0, 0]
    names = list(stages)
    rates = [mb / max(stages[n], 1e-9) for n in names]
    ax.barh(names, rates, color="C0")
    for y, v in enumerate(rates):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xlim(0, max(rates) * 1.15)
    ax.set_xlabel("MB/s of raw text through the stage")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    if pairs:
        ax = axes[0, 1]
        labels, values, colors = [], [], []
        for name, fast, peer, slow in pairs:
            labels += [f"{name}: fastlm C++", f"{name}: {peer}"]
            values += [fast, slow]
            colors += ["C0", "C7"]
        ax.barh(labels, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.15)
        ax.set_xlabel("MB/s, same documents")
        ax.set_title("kernels side by side (" + ", ".join(
            f"{n} {f / s_:.1f}x" for n, f, _, s_ in pairs) + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
