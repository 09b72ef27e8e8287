"""``meanflow presets``: list the named run configurations, one line each.

    meanflow presets
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``presets`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    parser = subparsers.add_parser("presets", help="list the presets")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print each preset's name and note; returns the exit code."""
    from ..presets import PRESETS, preset

    for name in sorted(PRESETS):
        print(f"{name:28s} {preset(name).note}")
    return 0


__all__ = ["add_parser", "run"]
