"""Every model type through `fastlm train`, tiny and random: fastlm's kernels against eager.

Where ``sweep_model_types.py`` checks one forward and backward of each transformers model type,
this one runs the trainer: for each type, 3 steps with ``attn_implementation="fastlm"`` and
``fastlm.patch`` and 3 with eager attention and no patch, from the same seed and data, and
compares the loss curves (relative 1e-4 by default; ``--tol`` for bf16). Any ``--set`` the
trainer takes applies to both runs (packed documents, activation checkpointing, ZeRO, bf16).

- ``--task causal``: a preset (``model.preset``, a YAML of the type's size keys) per causal LM
  type, pretrained from scratch.
- ``--task vlm``: a tiny vision-language model per image-text-to-text type, saved as a
  pretrained directory with a byte-level tokenizer and fine-tuned on text
  (``model.pretrained``); the fastlm run also exports it.

A type whose eager run fails (sizes it cannot take, packages not installed, inputs it needs
beyond text) is n/a: it says nothing about fastlm. The data is the byte-level tokens of
``--text`` (Python's own help text by default), prepared once. Types run in child processes,
``--chunk`` at a time (one process for all of them grew past this VM's memory).

    python benchmarks/sweep_train_types.py --task vlm --out benchmarks/results/train_types_vlm.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 3


def _kinds(task: str) -> list[str]:
    sys.path.insert(0, str(HERE))
    import sweep_model_types as s

    return sorted(s._tasks()["causal" if task == "causal" else s.VLM][1])


def _preset(kind: str, work: Path) -> str:
    """A YAML preset with the sizes of sweep_model_types.SIZES the type's config has (token
    ids and vocabulary come from the data)."""
    import sweep_model_types as s
    import yaml
    from transformers import AutoConfig

    base = AutoConfig.for_model(kind)
    skip = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id",
            "decoder_start_token_id"}
    keys = {k: v for k, v in s.SIZES.items() if hasattr(base, k) and k not in skip}
    keys.update(s._latent_sizes(base, keys))  # MLA's head sizes, hybrids' attention layer
    keys.update(s._hybrid_layers(base, keys))
    path = work / "presets" / f"{kind}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"model_type": kind, **keys}))
    return f"model.preset={path}"


def _pretrained(kind: str, work: Path, data: Path) -> str:
    """A tiny vision-language model saved with the data's tokenizer (vocabulary 300)."""
    import sweep_model_types as s
    import torch
    from transformers import AutoModelForImageTextToText

    conf = s._config(kind, s.VLM)
    text = conf.get_text_config(decoder=True)
    text.vocab_size = 300
    if getattr(text, "layer_types", None):  # _shrink set the layer count, not their types
        text.layer_types = text.layer_types[:text.num_hidden_layers]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(text, key):
            setattr(text, key, 256)
    torch.manual_seed(0)
    path = work / "pretrained" / kind
    AutoModelForImageTextToText.from_config(conf).save_pretrained(path)
    for f in (data / "tokenizer").iterdir():
        shutil.copy(f, path)
    return f"model.pretrained={path}"


def _one(kind: str, task: str, work: Path, data: Path, sets: list[str], tol: float,
         known: dict | None = None):
    """``known``: loss curves measured by an earlier worker (see :func:`_killed_row`)."""
    from fastlm.train.config import load_config
    from fastlm.train.trainer import train

    try:
        model = _preset(kind, work) if task == "causal" else _pretrained(kind, work, data)
    except Exception as exc:  # noqa: BLE001 - the row says why
        return "n/a", f"build: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    curves = dict(known or {})
    for impl in ("eager", "fastlm"):
        if impl in curves:
            continue
        out = work / "runs" / f"{kind}-{impl}"
        shutil.rmtree(out, ignore_errors=True)
        args = [f"out_dir={out}", model, f"data.path={data}", "data.block_size=32",
                "train.micro_batch_size=4", f"train.max_steps={STEPS}",
                f"eval.every={STEPS}", "eval.batches=2", f"checkpoint.every={STEPS}",
                "log.progress=false", "log.every=1", "sample.tokens=4",
                f"export={impl == 'fastlm' and task == 'vlm'}",
                f"model.attn_implementation={impl}", f"model.patch={impl == 'fastlm'}", *sets]
        try:
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                state = train(load_config(None, args))
        except Exception as exc:  # noqa: BLE001
            why = f"{impl}: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            return ("n/a" if impl == "eager" else "FAIL"), why
        curves[impl] = [loss for _, loss in state.history]
        # the parent reads it if the worker is killed later
        print(f"{kind} {impl} done {json.dumps(curves[impl])}", file=sys.stderr, flush=True)
    want, got = curves["eager"], curves["fastlm"]
    rel = max(abs(a - b) / abs(a) for a, b in zip(want, got))
    ok = len(want) == len(got) == STEPS and rel <= tol
    return ("pass" if ok else "MISMATCH"), (f"losses rel {rel:.1e}: eager "
                                            f"{', '.join(f'{x:.5f}' for x in want)}")


def _worker(args) -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(HERE))
    rows = []
    for kind in args.types.split(","):
        t0 = time.time()
        outcome, detail = _one(kind, args.task, Path(args.work), Path(args.data), args.set,
                               args.tol, json.loads(args.known) if args.known else None)
        rows.append([kind, outcome, detail])
        print(f"{kind:28s} {outcome:8s} {time.time() - t0:5.1f}s", file=sys.stderr, flush=True)
        Path(args.json).write_text(json.dumps(rows))  # a later type's kill keeps these
    return 0


def _eager_curve(kind: str, stderr: str) -> list | None:
    mark = f"{kind} eager done "
    return next((json.loads(line[len(mark):]) for line in stderr.splitlines()
                 if line.startswith(mark)), None)


def _killed_row(kind: str, proc, rerun) -> list:
    """The row of the type a worker died in. Its eager run died too: n/a (sizes this machine
    cannot hold say nothing about fastlm). Else the fastlm run died after eager's in the same
    process, whose heap the eager run has grown and fragmented: it reruns alone in a fresh
    worker (``rerun(kind, known)``), against the eager curve, and only its death
    there is a FAIL."""
    why = f"worker exited {proc.returncode}" + (" (killed: out of memory?)"
                                                if proc.returncode == -9 else "")
    eager = _eager_curve(kind, proc.stderr)
    if eager is None:
        return [kind, "n/a", f"eager: {why}"]
    again = rerun(kind, {"eager": eager})
    if again is not None:
        return again
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return [kind, "FAIL", f"fastlm (alone): {why}: {tail}"]


def _rerun(cmd: list, out: Path, kind: str, known: dict) -> list | None:
    """``kind`` alone in a fresh worker of ``cmd``, the ``known`` curves taken as measured."""
    i = cmd.index("--types")
    subprocess.run(cmd[:i + 1] + [kind] + cmd[i + 2:] + ["--known", json.dumps(known)],
                   capture_output=True, text=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    out.unlink(missing_ok=True)
    return rows[0] if rows else None


def _prepare(text: str, work: Path) -> Path:
    from fastlm.data import prepare
    from fastlm.data.sources import resolve_inputs

    return prepare(resolve_inputs([text], work / "sources"), work / "data", tokenizer="byte",
                   val_fraction=0.1, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["causal", "vlm"], default="causal")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a trainer override for both runs, e.g. data.boundaries=true")
    parser.add_argument("--tol", type=float, default=1e-4, help="loss curves' relative gap")
    parser.add_argument("--types", default=None, help="comma list (default: all)")
    parser.add_argument("--text", default="builtin:pydoc", help="training text to prepare")
    parser.add_argument("--chunk", type=int, default=15, help="types per child process")
    parser.add_argument("--out", default=None, help="markdown file to write")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--known", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    from tqdm import tqdm

    kinds = _kinds(args.task)
    if args.types:
        kinds = [k for k in kinds if k in args.types.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlm-sweep-") as tmp:
        work = Path(tmp)
        data = _prepare(args.text, work)
        bar = tqdm(total=len(kinds), desc="model types")
        todo = list(kinds)
        while todo:
            chunk, out = todo[:args.chunk], work / "rows.json"
            cmd = [sys.executable, __file__, "--worker", "--task", args.task, "--types",
                   ",".join(chunk), "--work", str(work), "--data", str(data), "--json",
                   str(out), "--tol", str(args.tol)] + [f"--set={s}" for s in args.set]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            done = json.loads(out.read_text()) if out.exists() else []
            out.unlink(missing_ok=True)
            if len(done) < len(chunk):  # died in the type after the last row: the rest rerun
                done.append(_killed_row(chunk[len(done)], proc,
                                        functools.partial(_rerun, cmd, out)))
            rows += done
            todo = todo[len(done):]
            bar.update(len(done))
        bar.close()
    import sweep_model_types as s

    counts = s.report(f"{args.task} model types through fastlm train", rows, args.out, notes=(
        f"{STEPS} steps each, fastlm (attention + patch) against eager from the same seed and "
        f"data; losses compared to a relative {args.tol:g}.",))
    return 1 if counts["MISMATCH"] or counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
