"""The attention tangent at 64-1024 tokens: dense (N x N scores) against blockwise (online softmax).

    python benchmarks/attention_tangent.py --rounds 7
    python benchmarks/attention_tangent.py --tokens 256 1024 4096 --rows 2

The tangent dO of softmax attention for M rows (``--rows``), ``--heads`` heads of width
``--head-dim``, without gradient, as the MeanFlow target computes it
(:mod:`meanflow.models.tangent`): ``attention_tangent_dense`` materialises the (N, N) scores,
``attention_tangent_blockwise`` streams over key blocks of ``--key-block`` and holds (N, block).
Times are medians (and ranges) of interleaved rounds; peak memory is the growth of the peak RSS of
a fresh process per (path, length) over the state after building the inputs. The library picks
the blockwise path from ``BLOCKWISE_TOKENS`` tokens on.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from meanflow.models import tangent
from train_step import step_memory

PATHS = {"dense": tangent.attention_tangent_dense, "blockwise": tangent.attention_tangent_blockwise}


def inputs(args, tokens: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(args.rows, args.heads, tokens, args.head_dim, generator=generator) for _ in range(6)]


def run(args, path: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if path == "dense":
        return tangent.attention_tangent_dense(*parts)
    return tangent.attention_tangent_blockwise(*parts, key_block=args.key_block)


def measure_memory(args, path: str, tokens: int) -> None:
    parts = inputs(args, tokens)
    with torch.no_grad():
        print(step_memory(lambda: run(args, path, parts)))


def peak_memory(args, path: str, tokens: int) -> float:
    command = [sys.executable, __file__, "--measure", path, str(tokens), "--rows", str(args.rows), "--heads",
               str(args.heads), "--head-dim", str(args.head_dim), "--key-block", str(args.key_block),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--rows", type=int, default=8, help="M, the rows whose tangent is computed")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--key-block", type=int, default=tangent.KEY_BLOCK)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        measure_memory(args, args.measure[0], int(args.measure[1]))
        return
    print(f"M = {args.rows} rows, {args.heads} heads x {args.head_dim}, key block {args.key_block}, {args.threads} "
          f"threads, CPU, torch {torch.__version__}; median (range) of {args.rounds} interleaved rounds; the "
          f"library switches to blockwise at {tangent.BLOCKWISE_TOKENS} tokens\n")
    print("| tokens | dense (ms) | blockwise (ms) | time ratio | dense peak (MiB) | blockwise peak (MiB) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        parts = inputs(args, tokens)
        times = {path: [] for path in PATHS}
        with torch.no_grad():
            difference = (run(args, "dense", parts) - run(args, "blockwise", parts)).abs().max().item()
            for round_ in range(args.rounds + 1):
                order = list(PATHS) if round_ % 2 == 0 else list(PATHS)[::-1]
                for path in order:
                    started = time.perf_counter()
                    run(args, path, parts)
                    if round_:  # the first round warms up
                        times[path].append(time.perf_counter() - started)
        cells = []
        for path in PATHS:
            values = [1e3 * value for value in times[path]]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        ratio = statistics.median(times["blockwise"]) / statistics.median(times["dense"])
        memory = [peak_memory(args, path, tokens) for path in PATHS]
        print(f"| {tokens} | {cells[0]} | {cells[1]} | {ratio:.2f}x | {memory[0]:.0f} | {memory[1]:.0f} | "
              f"{difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
