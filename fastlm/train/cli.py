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
    parser.add_argument("--dry-run", action="store_true",
                        help="print what the run would do (batch, tokens, parameters, FLOPs, "
                        "each rank's model-state memory, the DeepSpeed JSON) and exit; the "
                        "model is built on the meta device")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: plan for N ranks (default: the launcher's, or 1)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher


def run(args) -> int:
    from fastlm.train.config import load_config
    from fastlm.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        import os

        from fastlm.train.plan import plan, render, resolve_run_length, world_size

        world = world_size(args.world_size)
        cfg = resolve_run_length(cfg, world)
        text = render(plan(cfg, world), cfg)
        if os.environ.get("RANK", "0") == "0":
            print(text)
        return 0
    if args.world_size is not None:
        raise SystemExit("fastlm train: --world-size plans a run (with --dry-run); the "
                         "launcher sets the world of a real one")
    state = train(cfg, resume=args.resume)
    return 0 if state.step >= 0 else 1
