"""One process or many: the same code under ``torchrun`` (NCCL on GPU, gloo on CPU).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the
run is a single process and every collective below is a no-op. Training and evaluation both use
this module (neither imports the other), so each collective helper exists once:

- :class:`Distributed`: this process's rank, world size and device, with the few collectives
  the loops need (sum, mean, "any rank", gather of small objects);
- :func:`shard_range`, :func:`all_true`, :func:`process_group_ready`: the same for code that is
  handed a bare ``(rank, world_size)`` pair;
- :func:`resolve_device`: the one check of a device name (``--device``, ``training.device``)
  against the devices this machine has, used by training, sampling, evaluation and encoding;
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


def available_devices() -> list[str]:
    """The device names :func:`resolve_device` accepts on this machine, for messages."""
    names = ["auto", "cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        names += ["cuda", "cuda:0"] if count == 1 else ["cuda", f"cuda:0 .. cuda:{count - 1}"]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: Union[str, torch.device], setting: str = "device") -> torch.device:
    """The device ``name`` names, checked against what this machine has (before any work starts).

    'auto' is the GPU when CUDA sees one, else the CPU; 'cpu'; 'cuda' (no index: the current
    GPU, or under torchrun each process's LOCAL_RANK GPU, see :func:`init_distributed`);
    'cuda:N' with N below the number of GPUs; 'mps' where PyTorch has it. ``setting`` names the
    option in messages (``--device``, ``training.device``).

    Raises:
        DeviceUnavailableError (a ValueError): not a device name, or one this machine lacks;
            the message lists the devices it has.
    """
    from .errors import DeviceUnavailableError

    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = f"valid devices here: {', '.join(available_devices())}"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceUnavailableError(f"{setting} {str(name)!r} is not a device; {valid}") from None
    if device.type == "cpu" and device.index in (None, 0):
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "PyTorch sees no GPU: check the driver and CUDA_VISIBLE_DEVICES")
            raise DeviceUnavailableError(f"{setting} {str(name)!r}: no CUDA device is available ({why}); {valid}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(f"{setting} {str(name)!r}: this machine has {count} CUDA "
                                         f"device{'s' if count != 1 else ''}; {valid}")
        return device
    if device.type == "mps" and device.index in (None, 0) and _mps_available():
        return torch.device("mps")
    raise DeviceUnavailableError(f"{setting} {str(name)!r} is not available on this machine; {valid}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def init_distributed(device_name: Union[str, torch.device], setting: str = "training.device") -> Distributed:
    """Join the process group when launched by torchrun; pick this process's device.

    ``device_name`` is checked by :func:`resolve_device` (``setting`` names it in messages).
    Under torchrun 'cuda' means each process's LOCAL_RANK GPU, and a GPU index is refused (every
    process would take the same GPU).
    """
    from .errors import DeviceUnavailableError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, setting)
    if device.type == "cuda":
        if device.index is not None and world_size > 1:
            raise DeviceUnavailableError(f"under torchrun give {setting} cuda (each process takes its LOCAL_RANK "
                                         f"GPU), not {device}")
        if device.index is None:
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise DeviceUnavailableError(f"{setting} 'cuda': process LOCAL_RANK={local_rank} needs GPU "
                                             f"{local_rank} but this machine has {count}; start at most {count} "
                                             "processes per machine (torchrun --nproc_per_node)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
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


__all__ = ["Distributed", "all_true", "available_devices", "gather_state", "gather_to_main", "init_distributed",
           "is_sharded", "process_group_ready", "resolve_device", "shard_like", "shard_model", "shard_range",
           "shutdown"]
