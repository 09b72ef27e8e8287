"""Toy quality: 1-NFE MeanFlow against flow matching at 1-50 Euler steps, equal training budget.

    python benchmarks/toy_quality.py                       # checkerboard and eight Gaussians
    python benchmarks/toy_quality.py --toys spirals --steps 6000

Both methods train the same MLP with the same steps, batch, optimizer, EMA and plain squared
error (the preset ``toy-<name>``, p = 0); MeanFlow samples in one step, flow matching integrates
its velocity with Euler steps.
Scores are the energy distance and the sliced 2-Wasserstein distance between generated samples
and fresh exact samples of the distribution, and improved precision / recall (k = 3): the share
of generated points inside the data's k-NN manifold (sharpness) and of data points inside the
samples' (coverage). "data vs data" scores two fresh exact samples: what a perfect model reaches
at this sample size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from meanflow.eval.distances import energy_distance, sliced_wasserstein
from meanflow.eval.inception import precision_recall
from meanflow.inference import generate, load_model
from meanflow.presets import preset
from meanflow.toys import sample_toy
from meanflow.train import train


def scores(samples, reference, seed):
    manifold = precision_recall(reference, samples, k=3)
    return (energy_distance(samples, reference),
            sliced_wasserstein(samples, reference, num_projections=256, generator=torch.Generator().manual_seed(seed)),
            manifold["precision"], manifold["recall"])


def run_toy(name: str, args, folder: Path) -> list[dict]:
    preset_name = f"toy-{name.replace('_', '-')}"
    common = [f"training.steps={args.steps}", f"training.batch_size={args.batch_size}", "training.grid_steps=[1]",
              f"training.checkpoint_every={args.steps}", f"training.seed={args.seed}"]
    runs = {
        "MeanFlow": preset(preset_name).with_overrides(common),
        "flow matching": preset(preset_name).with_overrides(common + ["objective.method=flow_matching"]),
    }
    reference = sample_toy(name, args.samples, torch.Generator().manual_seed(10_000 + args.seed))
    floor = scores(sample_toy(name, args.samples, torch.Generator().manual_seed(20_000 + args.seed)), reference, 0)
    rows = [dict(toy=name, method="data vs data", nfe="-", energy=floor[0], sliced_w2=floor[1], precision=floor[2],
                 recall=floor[3], seconds=0.0)]
    for method, config in runs.items():
        started = time.perf_counter()
        train(config, folder / f"{name}-{method.replace(' ', '_')}", progress=False)
        seconds = time.perf_counter() - started
        loaded = load_model(folder / f"{name}-{method.replace(' ', '_')}")  # its run's own sampler
        grid = (1, 2) if method == "MeanFlow" else (1, 2, 4, 8, 50)
        for nfe in grid:
            samples = generate(loaded.model, args.samples, (2,), nfe, seed=args.seed + 1, sampler=loaded.sampler,
                               batch_size=args.samples)
            energy, w2, precision, recall = scores(samples, reference, nfe)
            label = method if method == "MeanFlow" else "flow matching (Euler)"
            rows.append(dict(toy=name, method=label, nfe=nfe, energy=energy, sliced_w2=w2, precision=precision,
                             recall=recall, seconds=seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toys", nargs="*", default=["checkerboard", "eight_gaussians"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.toys:
            rows += run_toy(name, args, Path(folder))
    print(f"{args.steps} steps x batch {args.batch_size} per method; {args.samples} samples per score\n")
    print("| toy | method | NFE | energy distance | sliced W2 | precision | recall | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['toy']} | {row['method']} | {row['nfe']} | {row['energy']:.4f} | {row['sliced_w2']:.4f} | "
              f"{row['precision']:.3f} | {row['recall']:.3f} | {row['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
