"""One process or many: the same training code under ``torchrun`` (DDP; NCCL on GPU, gloo on CPU).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the
run is a single process and every collective below is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place and return the tensor."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank gets the same dict)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        self.sum(packed)
        return {k: float(v) / self.world_size for k, v in zip(keys, packed.tolist())}

    def any(self, flag: bool) -> bool:
        """True on every rank if the flag is set on any rank."""
        if not self.enabled:
            return flag
        packed = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.sum(packed).item() > 0)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def init_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("training.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def shutdown(context: Distributed, together: bool = True) -> None:
    """Leave the process group. ``together`` (the normal end) waits for every rank first: a rank
    that tears gloo down while another still has collectives in flight can abort the other
    ("terminate called without an active exception"). After an error there is no waiting, since
    the other ranks may never arrive; torchrun stops them."""
    if context.enabled and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def is_sharded(tensor) -> bool:
    """True for a DTensor (a parameter or state sharded by FSDP2)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for sharded tensors: every rank must call it)."""
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` laid out like ``like``: sharded the same way if ``like`` is sharded."""
    if is_sharded(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
    return full.to(like.device)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: shard every element of the model's ModuleLists (transformer / U-Net blocks), then
    the root, so each block's parameters are gathered only while that block runs."""
    from torch.distributed.fsdp import fully_shard

    for child in model.modules():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(model)
