"""``fastlm env`` argument wiring (the report itself is fastlm/env.py)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--build", action="store_true",
        help="compile every extension that can be built here and report each result",
    )


def run(args) -> int:
    from fastlm.env import report

    return report(build=args.build)
