"""The ``meanflow`` command: a thin layer over the Python API.

    meanflow train  --preset digits [--set training.steps=500 ...] [--output runs/digits]
    meanflow sample --checkpoint runs/digits --num-samples 64 --steps 1
    meanflow demo
    meanflow presets
    meanflow encode --images ROOT --output CACHE
    meanflow eval --checkpoint runs/digits --metric domain --reference digits --steps 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def _config_from_args(args: argparse.Namespace):
    from .config import Config
    from .presets import preset

    if bool(args.preset) == bool(args.config):
        raise ValueError("give exactly one of --preset NAME or --config FILE")
    config = preset(args.preset) if args.preset else Config.load(args.config)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"training.steps={args.steps}")
    return config.with_overrides(overrides) if overrides else config


def cmd_train(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from .train import train

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


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .inference import balanced_labels, generate, load_model
    from .io import write_bytes_atomic

    loaded = load_model(args.checkpoint, args.weights, args.device)
    labels = None
    if loaded.num_classes is not None:
        if args.label is not None:
            if not 0 <= args.label < loaded.num_classes:
                raise ValueError(f"--label must lie in [0, {loaded.num_classes - 1}], got {args.label}")
            labels = torch.full((args.num_samples,), args.label, dtype=torch.long)
        else:
            labels = balanced_labels(args.num_samples, loaded.num_classes)
    elif args.label is not None:
        raise ValueError("--label given but the model is unconditional")
    samples = generate(loaded.model, args.num_samples, loaded.sample_shape, args.steps, labels, args.seed,
                       args.batch_size, args.device, args.intermediate, args.guidance_scale, loaded.num_classes,
                       args.ode)
    output = Path(args.output or Path(args.checkpoint) / f"samples_nfe{args.steps}.npz")
    arrays = {"samples": samples.numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(output, buffer.getvalue())
    print(f"{args.num_samples} samples ({args.steps} steps, weights {loaded.weights}, step {loaded.step}): {output}")
    grid = Path(args.grid) if args.grid else output.with_suffix(".png")
    from .eval.grids import save_image_grid, save_scatter

    if loaded.kind == "image":
        rows = loaded.num_classes if labels is not None and args.label is None else None
        save_image_grid(samples[: min(len(samples), 400)], grid, nrow=rows)
    else:
        save_scatter(samples, grid, title=f"{args.steps}-NFE samples")
    print(f"grid: {grid}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .presets import preset
    from .train import train

    output = Path(args.output)
    runs = [("digits", "digits"), ("toy-checkerboard", "toy-checkerboard")]
    results = []
    for name, folder in runs:
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


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .models import build_model

    config = _config_from_args(args)
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(config.model.architecture, config.model.options)
    count = sum(p.numel() for p in model.parameters())
    print(f"preset:      {args.preset or args.config}")
    print(f"model:       {config.model.architecture} {json.dumps(config.model.options)}")
    print(f"parameters:  {count:,} ({count / 1e6:.1f}M)")
    print(f"data:        {config.data.name}; batch {config.training.batch_size}; {config.training.steps:,} steps")
    print(f"note:        {config.note}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS, preset

    for name in sorted(PRESETS):
        print(f"{name:28s} {preset(name).note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meanflow", description="One-step generative modelling with MeanFlow.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a run")
    train.add_argument("--preset", help="a preset name (see `meanflow presets`)")
    train.add_argument("--config", help="a JSON config file (as written to <run>/config.json)")
    train.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override one field (repeatable)")
    train.add_argument("--steps", type=int, help="shorthand for --set training.steps=N")
    train.add_argument("--output", help="the run folder (default runs/<preset>); an existing run resumes")
    train.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser("sample", help="generate samples from a checkpoint")
    sample.add_argument("--checkpoint", required=True, help="a run folder or a checkpoints/step_<n> folder")
    sample.add_argument("--num-samples", type=int, default=64)
    sample.add_argument("--steps", type=int, default=1, help="number of sampling steps (NFE)")
    sample.add_argument("--intermediate", type=float, help="the middle time of 2-step sampling (default 0.5)")
    sample.add_argument("--weights", help="an EMA name such as ema_0.9999, or raw (default: the first EMA)")
    sample.add_argument("--label", type=int, help="generate this class only (default: all classes in turn)")
    sample.add_argument("--guidance-scale", type=float, default=1.0, help="inference-time CFG (doubles the NFE)")
    sample.add_argument("--ode", choices=["euler", "heun"], help="integrate u(z, t, t) instead (flow-matching models)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=256)
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--output", help="the .npz to write (default <checkpoint>/samples_nfe<k>.npz)")
    sample.add_argument("--grid", help="the PNG to write (default beside the .npz)")
    sample.set_defaults(run=cmd_sample)

    demo = commands.add_parser("demo", help="train class-conditional digits and a 2-D toy; write their samples")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--steps", type=int, help="override the number of training steps of both runs")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=cmd_demo)

    from .commands_encode import add_encode_parser
    from .commands_eval import add_eval_parser

    add_encode_parser(commands)
    add_eval_parser(commands)

    info = commands.add_parser("info", help="show a preset's model size and recipe")
    info.add_argument("--preset")
    info.add_argument("--config")
    info.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE")
    info.set_defaults(run=cmd_info, steps=None)

    presets = commands.add_parser("presets", help="list the presets")
    presets.set_defaults(run=cmd_presets)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ImportError, FileNotFoundError) as error:
        print(f"meanflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
