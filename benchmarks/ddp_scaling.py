"""Data-parallel scaling on this machine: `meanflow train` with 1 and 2 torchrun processes.

    python benchmarks/ddp_scaling.py --steps 60

Each process runs one thread (OMP_NUM_THREADS=1); the global batch is fixed, so 2 processes
each compute half of it. Throughput is the median samples/s over the logged windows after the
first (warm-up) one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(processes: int, args, folder: Path) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "meanflow.cli", "train", "--preset", args.preset, "--output", str(folder), "--no-progress",
               "--steps", str(args.steps), "--set", f"training.batch_size={args.batch_size}",
               "--set", "training.log_every=10", "--set", f"training.checkpoint_every={args.steps}",
               "--set", "training.grid_samples=10", "--set", "training.grid_steps=[1]", *args.set]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    rates = [json.loads(line)["samples_per_second"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--set", nargs="*", default=[], help="extra --set overrides, e.g. training.parallel=fsdp")
    args = parser.parse_args()
    args.set = [item for override in args.set for item in ("--set", override)]
    with tempfile.TemporaryDirectory() as folder:
        rates = {n: run(n, args, Path(folder) / f"p{n}") for n in (1, 2)}
    print(f"preset {args.preset}, global batch {args.batch_size}, {args.steps} steps, 1 thread per process\n")
    print("| processes | samples/s | speed-up |")
    print("|---|---|---|")
    for n, rate in rates.items():
        print(f"| {n} | {rate:.0f} | {rate / rates[1]:.2f}x |")


if __name__ == "__main__":
    main()
