"""Class-conditional MNIST on a CPU: MeanFlow, Improved MeanFlow and flow matching on one budget.

    python benchmarks/mnist.py --data ../shared/data/mnist.npz --steps 2000 --output runs/bench-mnist
    python benchmarks/mnist.py --data ../shared/data/mnist.npz --steps 2000 --methods imf meanflow_unguided

Trains with the same steps, batch, optimizer and EMA: ``meanflow`` (the ``mnist`` preset, omega' = 2
in the target, 1-NFE sampling), ``meanflow_unguided`` (the same with omega' = 1), ``flow_matching``
(the preset's DiT on plain squared error, Euler sampling) and ``imf`` (the ``imf-mnist`` preset: a
same-size imfDiT with guidance as an input). Writes sample grids (the one-step methods at 1 and
2 NFE; flow matching at 1, 2, 4, 8, 50 Euler steps) and prints the wall-clock times into
``<output>/summary.json`` (runs of an earlier call stay in it). Scores:
``benchmarks/mnist_eval.py`` on the same folder.
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

# name -> (preset, overrides applied before the budget's)
METHODS = {
    "meanflow": ("mnist", []),
    "meanflow_unguided": ("mnist", ["objective.meanflow.kappa=0.0"]),
    "flow_matching": ("mnist", ["objective.method=flow_matching"]),
    "imf": ("imf-mnist", []),
    "alpha_flow": ("alpha-flow-mnist", []),
    "shortcut": ("shortcut-mnist", []),
    "split_meanflow": ("split-meanflow-mnist", []),
    "consistency": ("consistency-mnist", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a local MNIST .npz (x_train, y_train); default: torchvision download")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default="runs/bench-mnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=["meanflow", "flow_matching"], choices=sorted(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    common = [f"training.steps={args.steps}", f"training.batch_size={args.batch_size}",
              f"training.checkpoint_every={max(args.steps // 4, 1)}", "training.grid_steps=[1, 2]"]
    if args.data:
        common.append(f"data.path={json.dumps(args.data)}")
    summary_path = output / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name in args.methods:
        preset_name, overrides = METHODS[name]
        config = preset(preset_name).with_overrides(overrides + common)
        started = time.perf_counter()
        train(config, output / name, progress=False)
        seconds = time.perf_counter() - started
        loaded = load_model(output / name)
        labels = balanced_labels(100, 10)
        grids = {}
        nfes = (1, 2, 4, 8, 50) if name == "flow_matching" else (1, 2)
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
        summary_path.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
