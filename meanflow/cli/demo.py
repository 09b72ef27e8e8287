"""``meanflow demo``: train class-conditional digits and a 2-D toy, and write their samples.

    meanflow demo [--output runs/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# (preset, run folder under --output)
DEMO_RUNS = (("digits", "digits"), ("toy-checkerboard", "toy-checkerboard"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    parser = subparsers.add_parser("demo", help="train class-conditional digits and a 2-D toy; write their samples")
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--steps", type=int, help="override the number of training steps of both runs")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train each demo run in turn and list the files written; returns the exit code."""
    from ..presets import preset
    from ..train import train

    output = Path(args.output)
    results = []
    for name, folder in DEMO_RUNS:
        config = preset(name)
        if args.steps is not None:
            config = config.with_overrides([f"training.steps={args.steps}"])
        print(f"== {name}: {config.note}", flush=True)
        started = time.perf_counter()
        result = train(config, output / folder, progress=not args.no_progress)
        results.append((name, result, time.perf_counter() - started))
    print("\nDone. Files:")
    for name, result, seconds in results:
        print(f"  {name} ({result.step} steps, {seconds:.0f} s): checkpoint {result.checkpoint}")
        for grid in result.grids:
            print(f"      {grid}")
    return 0


__all__ = ["DEMO_RUNS", "add_parser", "run"]
