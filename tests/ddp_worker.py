"""Run by tests/test_distributed.py, once under torchrun (2 processes) and once alone.

Takes three optimizer steps of MeanFlow (guidance in the target) on one fixed global batch of
explicit (x, noise, r, t, labels); each process uses its slice of the batch. Rank 0 writes the
final weights to the path given as the first argument. The second argument picks the wrapper:
``ddp`` (DistributedDataParallel, two-pass derivative) or ``fsdp-<derivative>`` (FSDP2
``fully_shard`` of every block and the root). ``gather`` shards the same model with FSDP2 and
gathers its weights and an EMA of them with :func:`meanflow.distributed.gather_state`: rank 0
writes what it got, every rank writes ``<output>.rank<r>.json`` saying whether it kept a copy.
``inf-on-rank-1`` trains a small run in which rank 1 alone sees an infinite loss (with finite
gradients) at its second step; rank 0 writes the outcome to ``<output>``.
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from meanflow.distributed import gather_state, shard_model
from meanflow.models.dit import DiT, DiTConfig
from meanflow.objectives import AdaptiveWeighting, MeanFlow, TrainingGuidance
from meanflow.train.ema import EMA


def build_model() -> DiT:
    """The same small float64 DiT in every process."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                          num_classes=3, frequency_size=16)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def gather(output: str, rank: int) -> None:
    """FSDP2-shard the model, then gather model and EMA state: full copies on rank 0 only."""
    model = build_model()
    shard_model(model)
    ema = EMA(model, (0.9,))
    kept = {}
    for part, tensors in (("model", model.state_dict()), ("ema", ema.state_tensors())):
        assert any(hasattr(v, "full_tensor") for v in tensors.values()), "nothing is sharded"
        full = gather_state(tensors, keep=rank == 0)
        if full is not None:
            assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in full.values())
            kept.update({f"{part}/{k}": v.contiguous() for k, v in full.items()})
    with open(f"{output}.rank{rank}.json", "w") as handle:
        json.dump({"kept": bool(kept), "tensors": len(kept)}, handle)
    if rank == 0:
        save_file(kept, output)
    del model, ema
    gc.collect()


def inf_on_rank_1(output: str, rank: int) -> None:
    """Every rank must skip the step whose loss only rank 1 sees as infinite."""
    from meanflow.distributed import shutdown
    from meanflow.presets import preset
    from meanflow.train.loop import Trainer

    config = preset("toy-two-moons").with_overrides([
        "training.steps=4", "training.batch_size=16", "training.checkpoint_every=4", "training.log_every=2",
        "model.options.hidden_size=16", "model.options.depth=2", "training.grid_samples=16"])
    trainer = Trainer(config, os.path.dirname(output), progress=False)
    real_loss, calls = trainer.take_step.loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if rank == 1 and calls["n"] == 2:
            out.loss = out.loss + float("inf")  # the gradient stays finite: only the loss flag can tell
        return out

    trainer.take_step.loss = loss
    result = trainer.run()  # raises if the ranks' weights diverged
    if rank == 0:
        with open(output, "w") as handle:
            json.dump({"step": result.step, "skipped": result.skipped_steps, "calls": calls["n"]}, handle)
    context = trainer.dist
    del trainer, result
    gc.collect()
    shutdown(context)


def main(output: str, mode: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if mode == "inf-on-rank-1":
        inf_on_rank_1(output, rank)  # the trainer joins the process group itself
        return
    if world > 1:
        dist.init_process_group("gloo")
    if mode == "gather":
        gather(output, rank)
        dist.barrier()
        dist.destroy_process_group()
        return
    model = build_model()
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
        dist.barrier()  # leave together (see meanflow.distributed.shutdown)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
