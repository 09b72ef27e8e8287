"""bf16 autocast vs fp32: MeanFlow train-step time on the benchmark DiT (the JVP, target and loss
stay fp32 either way).

    python benchmarks/precision.py                   # CPU, 2 threads
    python benchmarks/precision.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from meanflow.models.dit import DiT, DiTConfig
from meanflow.objectives import MeanFlow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=16, in_channels=4, patch_size=2, hidden_size=256, depth=6, num_heads=4)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    objective = MeanFlow()
    x = torch.randn(args.batch_size, 4, 16, 16, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    times = {"fp32": [], "bf16": []}
    for round_ in range(args.rounds + 2):
        for name in times:
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = objective.loss(model, x, generator=generator).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(time.perf_counter() - started)
    fp32 = statistics.median(times["fp32"])
    print(f"DiT width 256, depth 6, 4x16x16, batch {args.batch_size}, {args.device}, {args.threads} threads\n")
    print("| precision | step (ms) | vs fp32 |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {statistics.median(values) / fp32:.2f}x |")


if __name__ == "__main__":
    main()
