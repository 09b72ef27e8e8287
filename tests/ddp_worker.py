"""Run by tests/test_distributed.py, once under torchrun (2 processes) and once alone.

Takes three optimizer steps of MeanFlow (guidance in the target) on one fixed global batch of
explicit (x, noise, r, t, labels); each process uses its slice of the batch. Rank 0 writes the
final weights to the path given as the first argument. The second argument picks the wrapper:
``ddp`` (DistributedDataParallel, two-pass derivative) or ``fsdp-<derivative>`` (FSDP2
``fully_shard`` of every block and the root).
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from meanflow.models.dit import DiT, DiTConfig
from meanflow.objectives import AdaptiveWeighting, MeanFlow, TrainingGuidance


def main(output: str, mode: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                          num_classes=3, frequency_size=16)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    derivative = "two_pass" if mode == "ddp" else mode.split("-", 1)[1]
    network = model
    if world > 1 and mode == "ddp":
        network = torch.nn.parallel.DistributedDataParallel(model)
    elif world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    objective = MeanFlow(weighting=AdaptiveWeighting(p=0.75, c=1e-3), num_classes=3,
                         guidance=TrainingGuidance(omega=1.0, kappa=0.5), derivative=derivative)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    batch = 8
    for _ in range(3):
        x = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
        a, b = torch.rand(batch, generator=g, dtype=torch.float64), torch.rand(batch, generator=g, dtype=torch.float64)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r[::2] = t[::2]
        labels = torch.randint(0, 4, (batch,), generator=g)  # 3 = the null class
        rows = slice(rank * batch // world, (rank + 1) * batch // world)
        loss = objective.loss_at(network, x[rows], noise[rows], r[rows], t[rows], labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, output)
    if world > 1:
        del network, model, optimizer, objective  # wrappers before their process group (see meanflow.train.loop.train)
        gc.collect()
        dist.barrier()  # leave together (see meanflow.train.distributed.shutdown)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
