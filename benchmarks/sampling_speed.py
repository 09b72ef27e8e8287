"""Sampling throughput: one-step MeanFlow sampling against a 50-step Euler ODE, on the benchmark DiT.

    python benchmarks/sampling_speed.py --rounds 5

The DiT of benchmarks/train_step.py (width 256, depth 6, 4x16x16, patch 2), a batch of
``--batch-size`` samples drawn by :func:`meanflow.sampling.sample` (1 and 2 average-velocity steps)
and :func:`meanflow.sampling.sample_ode` (Euler, 50 velocity evaluations): samples per second,
median (range) of interleaved rounds. The network evaluations dominate, so the ratio is about
the NFE ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meanflow.models.dit import DiT, DiTConfig
from meanflow.sampling import sample, sample_ode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=16, in_channels=4, patch_size=2, hidden_size=256, depth=6, num_heads=4)).eval()
    noise = torch.randn(args.batch_size, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    paths = {
        "MeanFlow, 1 step (1 NFE)": lambda: sample(model, noise, num_steps=1),
        "MeanFlow, 2 steps (2 NFE)": lambda: sample(model, noise, num_steps=2),
        "Euler ODE, 50 steps (50 NFE)": lambda: sample_ode(model, noise, num_steps=50, method="euler"),
    }
    times = {name: [] for name in paths}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):
            for name, run in paths.items():
                started = time.perf_counter()
                run()
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
    print(f"benchmark DiT, batch {args.batch_size}, {args.threads} threads, CPU, torch {torch.__version__}; "
          f"median (range) of {args.rounds} rounds\n")
    print("| sampler | seconds per batch | samples / s | vs 1 step |")
    print("|---|---|---|---|")
    one = statistics.median(times["MeanFlow, 1 step (1 NFE)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} ({min(values):.3f}-{max(values):.3f}) | {args.batch_size / median:.0f} | "
              f"{median / one:.1f}x |")


if __name__ == "__main__":
    main()
