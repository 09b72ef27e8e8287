"""The ``meanflow`` command: a thin layer over the Python API, one module per sub-command.

    meanflow train  --preset digits [--set training.steps=500 ...] [--output runs/digits]
    meanflow sample --checkpoint runs/digits --num-samples 64 --steps 1
    meanflow demo
    meanflow info --preset imagenet256-xl2
    meanflow presets
    meanflow encode --images ROOT --output CACHE
    meanflow eval --checkpoint runs/digits --metric domain --reference digits --steps 1 2 4

Each command module registers its parser with ``add_parser(subparsers)`` and does its work in
``run(args)``; the modules import torch and the library only inside ``run``, so ``--help`` and a
mistyped argument answer at once. ``python -m meanflow.cli ...`` (for ``torchrun``) is the same
command.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

# ``eval`` here is the command module (importing a submodule binds its name in this package).
from . import convert, demo, encode, eval, info, presets, sample, train  # noqa: A004
from .common import Parser, run_command

# In the order ``meanflow --help`` lists them.
COMMANDS = (train, sample, demo, encode, eval, info, presets, convert)


_DEBUG_HELP = "on an error, show its traceback too (also: MEANFLOW_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    """The ``meanflow`` parser with every command of :data:`COMMANDS` registered.

    ``--debug`` is global (``meanflow --debug train ...``) and also taken after the command.
    """
    parser = Parser(prog="meanflow", description="One-step generative modelling with MeanFlow.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        # SUPPRESS: a command's parser sets debug only when given, never resets the global flag.
        command.add_parser(subparsers).add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                                    help=_DEBUG_HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code.

    Never raises for a mistake of the user's: a bad argument, value or path returns 2 after one
    ``error:`` line (a bad argument adds a line pointing at ``--help``), a training run stopped
    by its non-finite policy returns 1, and Ctrl-C returns 130; no traceback unless ``--debug``
    (see :func:`meanflow.cli.common.run_command`).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse has printed the usage and the error (or --help)
        return 0 if exit_request.code is None else int(exit_request.code)
    return run_command(args)


__all__ = ["COMMANDS", "build_parser", "main"]
