"""``meanflow train``: train a run, or resume it by running the same command again.

    meanflow train --preset digits [--set training.steps=500 ...] [--output runs/digits]
    torchrun --nproc_per_node 8 -m meanflow.cli train --preset imagenet256-xl2 --set data.path=latents/

Exit codes: 0 when the run reached its last step or was stopped by SIGTERM / SIGINT (it wrote a
checkpoint; the same command resumes), on every torchrun process; 1 when the non-finite policy
stopped it; 2 for a mistake in the command, the configuration or the data, found before training.
(A signal sent to torchrun itself also ends torchrun with its own error report, whatever the
processes did: a retry script should signal the processes, or read the "stopped by a signal" line.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from .common import add_config_arguments, check_output_folder, config_from_args


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

    output = check_output_folder(args.output or f"runs/{args.preset or Path(args.config).stem}", "--output")
    started = time.perf_counter()
    result = train(config, output, progress=not args.no_progress)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a process of torchrun's, which exits after this command
        _ignore_late_signals()
    if not result.is_main:
        return 0  # under torchrun, rank 0 reports
    if result.interrupted:
        print(f"stopped by a signal at step {result.step}; run the same command to resume", flush=True)
    skipped = result.skipped_steps
    print(f"trained to step {result.step} in {time.perf_counter() - started:.0f} s; {skipped} step"
          f"{'' if skipped == 1 else 's'} skipped for a non-finite loss or gradient")
    print(f"checkpoint: {result.checkpoint}")
    for grid in result.grids:
        print(f"samples:    {grid}")
    return 0


def _ignore_late_signals() -> None:
    """Once the run has ended (its checkpoint written, the process group left), SIGTERM and
    SIGINT have nothing left to stop: ignore them until the process exits, so that a late one --
    torchrun forwards the signal it got to processes that already had their own -- cannot turn a
    clean end into a kill (exit -15). Only the command under torchrun does this (its process
    ends with the command); ``train()`` and ``main()`` called in a Python session leave its
    handlers as they found them."""
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(stop_signal, signal.SIG_IGN)
        except ValueError:  # not the main thread: signals are not ours to handle
            pass


__all__ = ["add_parser", "run"]
