"""Cost of d/dt u (Eq. 5): torch.func.jvp vs DiT.forward_with_tangent, against an ordinary forward.

    python benchmarks/jvp_speed.py                # the issue's setting: DiT width 256, depth 6, 2 threads, CPU
    python benchmarks/jvp_speed.py --rounds 30 --json jvp_speed.json

Every JVP uses the MeanFlow tangent (dz, dr, dt) = (v, 0, 1) and runs without gradient, as the
'two_pass' target does. Times are medians over interleaved rounds in one process, after warm-up
rounds, so every method sees the same machine state; ratios are to the no-grad forward of the
same rows. The forward+backward row is the gradient half of a training step at the full batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from meanflow.models.dit import DiT, DiTConfig


def build_model(args) -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=args.input_size, in_channels=args.channels, patch_size=args.patch_size,
                          hidden_size=args.width, depth=args.depth, num_heads=args.heads))
    with torch.no_grad():  # open the adaLN-Zero gates so every branch does real work
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def cases(args, model: DiT) -> dict[str, Callable[[], object]]:
    """name -> a closure running one measured call."""
    generator = torch.Generator().manual_seed(1)

    def batch(size: int):
        z = torch.randn(size, args.channels, args.input_size, args.input_size, generator=generator)
        t = torch.rand(size, generator=generator)
        r = t * torch.rand(size, generator=generator)
        return z, r, t, torch.randn(z.shape, generator=generator)  # z, r, t, v

    z, r, t, v = batch(args.jvp_batch)
    z2, r2, t2, _ = batch(2 * args.jvp_batch)
    zeros, ones = torch.zeros_like(r), torch.ones_like(t)
    zt, rt, tt, vt = batch(args.train_batch)

    def forward(z_=z, r_=r, t_=t):
        with torch.no_grad():
            return model(z_, r_, t_)

    def forward_inference():
        with torch.inference_mode():
            return model(z, r, t)

    def func_jvp():
        with torch.no_grad():
            return torch.func.jvp(lambda a, b, c: model(a, b, c), (z, r, t), (v, zeros, ones))

    def with_tangent():
        with torch.no_grad():
            return model.forward_with_tangent(z, r, t, None, v, zeros, ones)

    def with_tangent_inference():
        with torch.inference_mode():
            return model.forward_with_tangent(z, r, t, None, v, zeros, ones)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss = (model(zt, rt, tt) - vt).square().mean()
        loss.backward()

    n, m = args.jvp_batch, args.train_batch
    return {
        f"forward, no_grad, {n} samples": forward,
        f"forward, inference_mode, {n} samples": forward_inference,
        f"forward, no_grad, {2 * n} samples": lambda: forward(z2, r2, t2),
        f"torch.func.jvp, no_grad, {n} samples": func_jvp,
        f"forward_with_tangent, no_grad, {n} samples": with_tangent,
        f"forward_with_tangent, inference_mode, {n} samples": with_tangent_inference,
        f"forward + backward, {m} samples": forward_backward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jvp-batch", type=int, default=8, help="rows of the JVP (the r != t share of a batch)")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    if args.rounds < 10:
        parser.error("--rounds must be at least 10")
    torch.set_num_threads(args.threads)

    model = build_model(args)
    runs = cases(args, model)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.warmup + args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians[next(iter(runs))]

    print(f"DiT width {args.width}, depth {args.depth}, heads {args.heads}, {args.channels}x{args.input_size}x"
          f"{args.input_size}, patch {args.patch_size}, unconditional; {args.threads} threads, CPU, "
          f"torch {torch.__version__}; median of {args.rounds} interleaved rounds after {args.warmup} warm-up\n")
    print(f"| call | ms | vs forward of {args.jvp_batch} |")
    print("|---|---|---|")
    rows = []
    for name, seconds in medians.items():
        rows.append(dict(call=name, ms=seconds * 1e3, ratio=seconds / base))
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
