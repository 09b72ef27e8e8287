"""``meanflow sample``: generate samples from a checkpoint; write them as .npz and a PNG grid.

    meanflow sample --checkpoint runs/digits --num-samples 64 --steps 1

The run's own sampler is used (average-velocity steps for MeanFlow, an Euler ODE for flow
matching; ``--ode`` overrides it), latent samples are decoded by the run's VAE, and the file
is the one sample format (:mod:`meanflow.sample_files`) that ``meanflow eval`` also writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import check_output_file, guidance_interval, positive_int, seed


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sample`` on the ``meanflow`` command's sub-parsers; returns its parser."""
    parser = subparsers.add_parser("sample", help="generate samples from a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="a run folder or a checkpoints/step_<n> folder")
    parser.add_argument("--num-samples", type=positive_int, default=64)
    parser.add_argument("--steps", type=positive_int,
                        help="sampling steps (default: 1 for average-velocity models, 50 for ODE samplers); the "
                             "report states the true number of network evaluations (NFE)")
    parser.add_argument("--intermediate", type=float,
                        help="the middle time of 2-step sampling (default: the run's sampler's; 0.5 for "
                             "average-velocity steps)")
    parser.add_argument("--weights", help="an EMA name such as ema_0.9999, or raw (default: the first EMA)")
    parser.add_argument("--label", type=int, help="generate this class only, 0..C-1 (default: all classes in turn)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="inference-time CFG (doubles the NFE)")
    parser.add_argument("--omega", type=float,
                        help="iMF runs: the guidance scale the network is conditioned on (default: the run's own; "
                             "1 NFE a step whatever the value)")
    parser.add_argument("--interval", type=guidance_interval, metavar="T_MIN,T_MAX",
                        help="iMF runs: the guidance interval, e.g. 0.4,0.65 (default: the run's own)")
    parser.add_argument("--ode", choices=["euler", "heun"],
                        help="integrate u(z, t, t) with this method instead of the run's own sampler")
    parser.add_argument("--seed", type=seed, default=0, help="sample i starts from noise seeded by (seed, i); >= 0")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (memory only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--output", help="the .npz to write (default <run>/samples/<weights>_<sampler>[...].npz, "
                                         "named by every setting so that calls do not overwrite each other)")
    parser.add_argument("--grid", help="the PNG to write (default beside the .npz)")
    parser.add_argument("--vae", help="the VAE decoding a latent run's samples (default: the one its run record names)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate ``args.num_samples`` samples and write the .npz and the grid; returns the exit code."""
    import math

    from ..distributed import resolve_device
    from ..inference import generate, load_model
    from ..sample_files import write_sample_file
    from ..samplers import ode_sampler

    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    device = str(resolve_device(args.device, "--device"))
    # Every path is checked before the weights are read and long before any sample is drawn.
    output = check_output_file(args.output, "--output", "samples.npz") if args.output else None
    grid = check_output_file(args.grid, "--grid", "grid.png") if args.grid else None
    loaded = load_model(args.checkpoint, args.weights, device)
    encoder = loaded.encoder.with_vae(args.vae)  # refused at once for runs without latents
    sampler = (ode_sampler(args.ode) or loaded.sampler).with_guidance(args.omega, args.interval)
    steps = args.steps or sampler.default_steps
    labels = _labels(args, loaded.num_classes)
    if output is None:
        output = check_output_file(_default_output(args, loaded, sampler, steps), "the sample file (--output)",
                                   "samples.npz")
    if grid is None:
        grid = check_output_file(output.with_suffix(".png"), "the grid (--grid)", "grid.png")
    samples = generate(loaded.model, args.num_samples, loaded.sample_shape, steps, labels, args.seed,
                       args.batch_size, device, args.intermediate, args.guidance_scale, loaded.num_classes,
                       sampler=sampler, progress=not args.no_progress)
    write_sample_file(output, encoder.file_rows(samples.to(device)), None if labels is None else labels.numpy())
    nfe = sampler.nfe(steps, args.guidance_scale)
    print(f"{args.num_samples} samples ({sampler.name} sampler, {steps} steps = {nfe} NFE, weights {loaded.weights}, "
          f"step {loaded.step}): {output}")
    shown = samples[: encoder.grid_samples(400)]  # an image grid shows 400, a scatter plot up to 2000 points
    rows = loaded.num_classes if labels is not None and args.label is None and len(shown) % loaded.num_classes == 0 \
        else None
    encoder.write_grid(shown.to(device), grid, nrow=rows, title=f"{nfe}-NFE samples")
    print(f"grid: {grid}")
    return 0


def _labels(args: argparse.Namespace, num_classes):
    import torch

    from ..inference import balanced_labels

    if num_classes is None:
        if args.label is not None:
            raise ValueError("--label given but the model is unconditional")
        return None
    if args.label is not None:
        if not 0 <= args.label < num_classes:
            raise ValueError(f"--label must be a class id in [0, {num_classes - 1}] (the model has {num_classes} "
                             f"classes), got {args.label}")
        return torch.full((args.num_samples,), args.label, dtype=torch.long)
    return balanced_labels(args.num_samples, num_classes)


def _default_output(args: argparse.Namespace, loaded, sampler, steps: int) -> Path:
    """``<run>/samples/<weights>_step<n>_<sampler>[_t<mid>][_cfg<w>][_class<c>]_seed<s>.npz``."""
    parts = [loaded.weights, f"step{loaded.step}", sampler.describe(steps, args.intermediate)]
    if args.guidance_scale != 1.0:
        parts.append(f"cfg{args.guidance_scale:g}")
    if args.label is not None:
        parts.append(f"class{args.label}")
    parts.append(f"seed{args.seed}")
    run_folder = loaded.path.parent.parent  # checkpoints/step_<n> -> the run folder
    return run_folder / "samples" / ("_".join(parts) + ".npz")


__all__ = ["add_parser", "run"]
