"""How much the noise set alone moves a toy score: one trained model, several noise seeds.

    python benchmarks/noise_spread.py                      # checkerboard, 3000 steps, seeds 1-5

Trains the MeanFlow preset ``toy-<name>`` once, then scores 1-NFE samples from the same model
with noise drawn by the project's per-sample scheme (:mod:`meanflow.noise`) and, for
comparison, with one torch draw per batch (the scheme before issue 9), against one fixed set of
exact reference points. The spread between seeds is the resolution of a single-seed toy score.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from meanflow.eval.distances import energy_distance
from meanflow.inference import load_model
from meanflow.noise import sample_noise
from meanflow.presets import preset
from meanflow.toys import sample_toy
from meanflow.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", default="checkerboard")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"training.steps={args.steps}", "training.batch_size=512", "training.grid_steps=[1]",
                 f"training.checkpoint_every={args.steps}", "training.seed=0"]
    reference = sample_toy(args.toy, args.samples, torch.Generator().manual_seed(10_000))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        train(preset(f"toy-{args.toy.replace('_', '-')}").with_overrides(overrides), Path(folder) / "run",
              progress=False)
        loaded = load_model(Path(folder) / "run")
        for seed in args.seeds:
            per_sample = sample_noise(seed, range(args.samples), (2,))
            per_batch = torch.randn((args.samples, 2), generator=torch.Generator().manual_seed(seed * 1_000_003))
            with torch.no_grad():
                scores = [energy_distance(loaded.sampler(loaded.model, noise, num_steps=1), reference)
                          for noise in (per_sample, per_batch)]
            rows.append((seed, *scores))
    print(f"{args.toy}, {args.steps} steps, 1-NFE energy distance against {args.samples} fixed reference points\n")
    print("| noise seed | per-sample noise (now) | per-batch torch noise (before) |")
    print("|---|---|---|")
    for seed, now, before in rows:
        print(f"| {seed} | {now:.4f} | {before:.4f} |")
    print(f"| median | {statistics.median(r[1] for r in rows):.4f} | {statistics.median(r[2] for r in rows):.4f} |")


if __name__ == "__main__":
    main()
