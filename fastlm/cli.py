"""The ``fastlm`` command: env, prepare, tokenizer, train, generate, export, eval, bench.

Each subcommand lives in the module that owns it; this file only wires them. A module provides
``add_arguments(parser)`` and ``run(args) -> int``. Subcommands whose module is not installed
yet say so and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastlm import _gc

# name -> (module providing add_arguments/run, one-line help)
SUBCOMMANDS = {
    "env": ("fastlm.cli_env", "report versions, compilers, CPU/GPU features and op backends"),
    "prepare": ("fastlm.data.cli", "clean, deduplicate, tokenize and pack a corpus into shards"),
    "tokenizer": ("fastlm.data.train_tokenizer", "train one tokenizer on several corpora (for "
                                                 "the sources of a data mixture)"),
    "train": ("fastlm.train.cli", "pretrain or fine-tune a GPT model (one process; use the "
                                   "deepspeed launcher for several)"),
    "generate": ("fastlm.train.generate", "sample text from a checkpoint or Hugging Face directory"),
    "export": ("fastlm.train.export", "write a checkpoint as a Hugging Face model directory"),
    "eval": ("fastlm.train.evaluate", "loss and perplexity of a model on a prepared split or a "
                                      "text file"),
    "bench": ("fastlm.bench.cli", "kernel and training microbenchmarks side by side with peers"),
}


class UserError(Exception):
    """An error caused by the user's input: printed without a traceback, exit status 2."""


def _number(kind, ok, what: str):
    """An argparse ``type``: a ``kind`` number for which ``ok`` holds, else a usage error naming
    the option (0 or a negative count was taken, and silently meant the default or nothing)."""
    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return check


def at_least(low, kind=int):
    return _number(kind, lambda v: v >= low,
                   f"{'an integer' if kind is int else 'a number'} >= {low}")


positive = _number(float, lambda v: v > 0, "a number > 0")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # the subcommand's module is not part of this build yet
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="fastlm", description="Fast GPT training: fused kernels, DeepSpeed trainer, benchmarks."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = _load(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        if module is None:
            p.description = f"{help_text}\n(not yet available in this version of fastlm)"
        else:
            module.add_arguments(p)
        modules[name] = module
    return parser, modules


def _version() -> str:
    import fastlm

    return f"fastlm {fastlm.__version__}"


def main(argv: list[str] | None = None) -> int:
    _gc.pause()  # the imports create ~1M objects and no garbage; resumed below / by the trainer
    try:
        return _main(argv)
    finally:
        _gc.resume()


def _main(argv: list[str] | None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command != "train":  # the trainer resumes collection when its loop starts
        _gc.resume()
    else:
        from fastlm import _malloc

        _malloc.keep_freed_memory()  # no page faults for each step's tensors
    if args.command is None:
        parser.print_help()
        return 2
    module = modules[args.command]
    if module is None:
        print(f"fastlm {args.command}: not yet available in this version of fastlm", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"fastlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # Errors meant for users carry .user_facing (e.g. fastlm.data's errors): no traceback.
        if getattr(err, "user_facing", False):
            print(f"fastlm {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
