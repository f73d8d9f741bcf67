"""``fastlm train CONFIG [--set k=v ...] [--resume auto|PATH]`` and the same arguments under
``deepspeed [--hostfile H] --module fastlm.train CONFIG ...``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (see configs/); "
                        "default: built-in defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. "
                        "train.max_steps=200 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': continue from the run's latest checkpoint if there is "
                        "one; or a checkpoint path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def run(args) -> int:
    from fastlm.train.config import load_config
    from fastlm.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    state = train(cfg, resume=args.resume)
    return 0 if state.step >= 0 else 1
