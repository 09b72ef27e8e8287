"""``meanflow train``: train a run, or resume it by running the same command again.

    meanflow train --preset digits [--set training.steps=500 ...] [--output runs/digits]
    torchrun --nproc_per_node 8 -m meanflow.cli train --preset imagenet256-xl2 --set data.path=latents/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import add_config_arguments, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    parser = subparsers.add_parser("train", help="train (or resume) a run")
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, help="shorthand for --set training.steps=N")
    parser.add_argument("--output", help="the run folder (default runs/<preset>); an existing run resumes")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train (or print the configuration with ``--dry-run``); returns the exit code."""
    config = config_from_args(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from ..train import train

    output = Path(args.output or f"runs/{args.preset or Path(args.config).stem}")
    started = time.perf_counter()
    result = train(config, output, progress=not args.no_progress)
    if not result.is_main:
        return 0  # under torchrun, rank 0 reports
    if result.interrupted:
        print(f"stopped by a signal at step {result.step}; run the same command to resume")
    print(f"trained to step {result.step} in {time.perf_counter() - started:.0f} s")
    print(f"checkpoint: {result.checkpoint}")
    for grid in result.grids:
        print(f"samples:    {grid}")
    return 0


__all__ = ["add_parser", "run"]
