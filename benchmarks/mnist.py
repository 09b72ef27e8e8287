"""Class-conditional MNIST on a CPU: MeanFlow (CFG in training) and flow matching on one budget.

    python benchmarks/mnist.py --data ../shared/data/mnist.npz --steps 2000 --output runs/bench-mnist

Trains the ``mnist`` preset twice with the same steps, batch, model and optimizer: MeanFlow
(omega' = 2 in the target, 1-NFE sampling) and flow matching (plain squared error, Euler
sampling). Writes sample grids (MeanFlow at 1 and 2 NFE; flow matching at 1, 2, 4, 8, 50 Euler
steps) and prints the wall-clock times. Scores: ``benchmarks/mnist_eval.py`` on the same folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from meanflow.grids import save_image_grid
from meanflow.inference import balanced_labels, generate, load_model
from meanflow.presets import preset
from meanflow.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a local MNIST .npz (x_train, y_train); default: torchvision download")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default="runs/bench-mnist")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    common = [f"training.steps={args.steps}", f"training.batch_size={args.batch_size}",
              f"training.checkpoint_every={max(args.steps // 4, 1)}", "training.grid_steps=[1, 2]"]
    if args.data:
        common.append(f"data.path={json.dumps(args.data)}")
    runs = {
        "meanflow": preset("mnist").with_overrides(common),
        "flow_matching": preset("mnist").with_overrides(common + ["objective.method=flow_matching"]),
    }
    summary = {}
    for name, config in runs.items():
        started = time.perf_counter()
        train(config, output / name, progress=False)
        seconds = time.perf_counter() - started
        loaded = load_model(output / name)
        labels = balanced_labels(100, 10)
        grids = {}
        nfes = (1, 2) if name == "meanflow" else (1, 2, 4, 8, 50)
        for nfe in nfes:
            samples = generate(loaded.model, 100, loaded.sample_shape, nfe, labels, seed=0,
                               sampler=loaded.sampler)
            path = output / f"{name}_nfe{nfe}.png"
            save_image_grid(samples, path, nrow=10)
            grids[nfe] = str(path)
        summary[name] = {"train_seconds": seconds, "steps": args.steps, "batch_size": args.batch_size,
                         "grids": grids, "weights": loaded.weights}
        print(f"{name}: {args.steps} steps x {args.batch_size} in {seconds / 60:.1f} min; grids {list(grids.values())}",
              flush=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
