"""``meanflow info``: a configuration's model size and recipe, without building its weights.

    meanflow info --preset imagenet256-xl2 [--set model.options.depth=12]
"""

from __future__ import annotations

import argparse
import json

from .common import add_config_arguments, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``info`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    parser = subparsers.add_parser("info", help="show a preset's model size and recipe")
    add_config_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the parameter count, data and schedule of the configuration; returns the exit code."""
    import torch

    from ..models import build_model

    config = config_from_args(args)
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(config.model.architecture, config.model.options)
    count = sum(p.numel() for p in model.parameters())
    print(f"preset:      {args.preset or args.config}")
    print(f"model:       {config.model.architecture} {json.dumps(config.model.options)}")
    print(f"parameters:  {count:,} ({count / 1e6:.1f}M)")
    print(f"data:        {config.data.name}; batch {config.training.batch_size}; {config.training.steps:,} steps")
    print(f"note:        {config.note}")
    return 0


__all__ = ["add_parser", "run"]
