"""One process or many: the same code under ``torchrun`` (NCCL on GPU, gloo on CPU).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the
run is a single process and every collective below is a no-op. Training and evaluation both use
this module (neither imports the other), so each collective helper exists once:

- :class:`Distributed`: this process's rank, world size and device, with the few collectives
  the loops need (sum, mean, "any rank", gather of small objects);
- :func:`shard_range`, :func:`all_true`, :func:`process_group_ready`: the same for code that is
  handed a bare ``(rank, world_size)`` pair;
- FSDP2 helpers: :func:`shard_model`, :func:`shard_like`, and :func:`gather_to_main` /
  :func:`gather_state`, which gather sharded tensors one at a time and keep the full copy on
  rank 0 only (a whole XL/2 model, EMA and optimizer state is about 10 GB per copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor


def process_group_ready() -> bool:
    """True when a torch.distributed process group is up (collectives may be called)."""
    return dist.is_available() and dist.is_initialized()


def shard_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Process ``rank``'s contiguous slice ``[start, end)`` of ``total`` items; the slices of all
    ranks tile ``[0, total)`` in rank order and differ in length by at most one."""
    return rank * total // world_size, (rank + 1) * total // world_size


def all_true(flag: bool, world_size: int, device: Union[str, torch.device]) -> bool:
    """True on every process when ``flag`` holds on every process (one all-reduce)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


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

    def sum(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) in place and return the tensor; no host read."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean over ranks of ``tensor`` (a new tensor, the same on every rank); no host read."""
        if not self.enabled:
            return tensor.clone()
        return self.sum(tensor.clone()) / self.world_size

    def mean_of(self, values: Mapping[str, Union[float, Tensor]]) -> dict[str, float]:
        """The mean over ranks of each value, as host floats (every rank gets the same dict).

        Values may be floats or 0-d device tensors; they are packed into one tensor, reduced in
        one all-reduce and read back in one transfer.
        """
        if not values:
            return {}
        keys = sorted(values)
        packed = torch.stack([_as_scalar(values[k], self.device) for k in keys])  # (K,) float64
        return dict(zip(keys, self.mean(packed).tolist()))

    def any(self, flag: bool) -> bool:
        """True on every rank if the flag is set on any rank."""
        if not self.enabled:
            return flag
        packed = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.sum(packed).item() > 0)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small, picklable), in rank order (on every rank)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def _as_scalar(value: Union[float, Tensor], device: torch.device) -> Tensor:
    """A 0-d float64 tensor on ``device``; a host float becomes a fill, not a host-to-device copy
    (which would synchronise a CUDA stream)."""
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


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


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (a parameter or state sharded by FSDP2)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def gather_to_main(tensor: Tensor, keep: bool) -> Optional[Tensor]:
    """The whole of ``tensor`` on the CPU where ``keep`` (rank 0), None elsewhere.

    For a sharded tensor this is a collective (every rank must call it, in the same order): the
    full tensor exists on each rank's device only for the duration of this call, and ranks that
    do not keep it drop it at once. A plain tensor needs no communication.
    """
    if is_sharded(tensor):
        tensor = tensor.full_tensor()
    if not keep:
        return None
    return tensor.detach().cpu()


def gather_state(tensors: Mapping[str, Tensor], keep: bool) -> Optional[dict[str, Tensor]]:
    """:func:`gather_to_main` of every tensor, one at a time, in the mapping's order: the full
    state on the CPU where ``keep``, None elsewhere (no rank but the keeper ever holds a whole
    copy)."""
    gathered = {key: gather_to_main(value, keep) for key, value in tensors.items()}
    return gathered if keep else None


def shard_like(full: Tensor, like: Any) -> Tensor:
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


__all__ = ["Distributed", "all_true", "gather_state", "gather_to_main", "init_distributed", "is_sharded",
           "process_group_ready", "shard_like", "shard_model", "shard_range", "shutdown"]
