"""Toy quality: one-step methods against flow matching at 1-50 Euler steps, equal training budget.

    python benchmarks/toy_quality.py                       # checkerboard and eight Gaussians
    python benchmarks/toy_quality.py --toys spirals --steps 6000
    python benchmarks/toy_quality.py --methods meanflow imf flow_matching
    python benchmarks/toy_quality.py --methods meanflow imf alpha_flow shortcut split_meanflow consistency \
        flow_matching --toys checkerboard eight_gaussians rings --seeds 0 1 2      # the family (FAMILY.md F7)

Every method trains the same MLP with the same steps, batch, optimizer and EMA (the preset
``toy-<name>``, MeanFlow with p = 0; the others ``toy-<name>-<method>``, whose MLP adds what the
objective needs, e.g. iMF's guidance inputs and v head); the one-step methods are scored at 1, 2
and 4 steps with their own samplers, flow matching integrates its velocity with Euler steps. The
train time of each run stands beside its scores (equal steps, not equal wall-clock).
Scores are the energy distance and the sliced 2-Wasserstein distance between generated samples
and fresh exact samples of the distribution, and improved precision / recall (k = 3): the share
of generated points inside the data's k-NN manifold (sharpness) and of data points inside the
samples' (coverage). "data vs data" scores two fresh exact samples: what a perfect model reaches
at this sample size.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


# method -> (preset suffix after toy-<name>, overrides, NFEs scored, table label). Every method
# trains the same MLP width and depth on the same budget; iMF's MLP adds the guidance inputs and
# the v head its objective needs.
METHODS = {
    "meanflow": ("", [], (1, 2, 4), "MeanFlow"),
    "imf": ("-imf", [], (1, 2, 4), "iMF"),
    "alpha_flow": ("-alpha-flow", [], (1, 2, 4), "alpha-Flow"),
    "shortcut": ("-shortcut", [], (1, 2, 4), "Shortcut"),
    "split_meanflow": ("-split-meanflow", [], (1, 2, 4), "SplitMeanFlow"),
    "consistency": ("-consistency", [], (1, 2, 4), "consistency (iCT)"),
    "flow_matching": ("", ["objective.method=flow_matching"], (1, 2, 4, 8, 50), "flow matching (Euler)"),
}


def run_toy(name: str, args, folder: Path, seed: int) -> list[dict]:
    """Train every method of ``args.methods`` on the toy with this seed and score it; one row per NFE."""
    common = [f"training.steps={args.steps}", f"training.batch_size={args.batch_size}", "training.grid_steps=[1]",
              f"training.checkpoint_every={args.steps}", f"training.seed={seed}"]
    reference = sample_toy(name, args.samples, torch.Generator().manual_seed(10_000 + seed))
    floor = scores(sample_toy(name, args.samples, torch.Generator().manual_seed(20_000 + seed)), reference, 0)
    rows = [dict(toy=name, method="data vs data", nfe="-", energy=floor[0], sliced_w2=floor[1], precision=floor[2],
                 recall=floor[3], seconds=0.0, seed=seed)]
    for method in args.methods:
        suffix, overrides, grid, label = METHODS[method]
        config = preset(f"toy-{name.replace('_', '-')}{suffix}").with_overrides(common + overrides)
        run = folder / f"{name}-{method}-seed{seed}"
        started = time.perf_counter()
        train(config, run, progress=False)
        seconds = time.perf_counter() - started
        loaded = load_model(run)  # its run's own sampler
        for nfe in grid:
            samples = generate(loaded.model, args.samples, (2,), nfe, seed=seed + 1, sampler=loaded.sampler,
                               batch_size=args.samples)
            energy, w2, precision, recall = scores(samples, reference, nfe)
            rows.append(dict(toy=name, method=label, nfe=nfe, energy=energy, sliced_w2=w2, precision=precision,
                             recall=recall, seconds=seconds, seed=seed))
    return rows


def spread(values: list[float], digits: int) -> str:
    """One seed: the value; several: the median and [min, max]."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def print_table(rows: list[dict]) -> None:
    """A markdown table, one line per (toy, method, NFE), seeds pooled."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["toy"], row["method"], row["nfe"]), []).append(row)
    print("| toy | method | NFE | energy distance | sliced W2 | precision | recall | train time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for (toy, method, nfe), group in groups.items():
        cells = [spread([row[key] for row in group], digits) for key, digits in
                 (("energy", 4), ("sliced_w2", 4), ("precision", 3), ("recall", 3))]
        seconds = statistics.median(row["seconds"] for row in group)
        print(f"| {toy} | {method} | {nfe} | {' | '.join(cells)} | {seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toys", nargs="*", default=["checkerboard", "eight_gaussians"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training / noise / reference seeds; with several, the table gives the median and range")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=["meanflow", "flow_matching"], choices=sorted(METHODS))
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.toys:
            for seed in args.seeds:
                rows += run_toy(name, args, Path(folder), seed)
    print(f"{args.steps} steps x batch {args.batch_size} per method; {args.samples} samples per score; "
          f"seeds {args.seeds}" + (" (median [min, max] over seeds)" if len(args.seeds) > 1 else "") + "\n")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
